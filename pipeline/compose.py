"""Composing a base policy and a refiner for evaluation: the pipeline's side of the policy seam.

:func:`difftori.eval.evaluate.evaluate` takes a picklable :class:`~difftori.eval.evaluate.PolicyLoader`
and never imports the refiners; :class:`RefinedPolicyLoader` is the loader of (base, refiner).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftori.base_policies import load_policy
from difftori.eval.evaluate import BasePolicyLoader, LoadedPolicy, PolicyLoader, base_label
from difftori.refiners import REFINERS, RefinedPolicy


@dataclass(frozen=True)
class RefinedPolicyLoader:
    """``RefinedPolicy(base, refiner)`` from their checkpoint directories."""

    base: str
    refiner: str

    @property
    def checkpoints(self) -> dict[str, str | None]:
        return {"base": self.base, "refiner": self.refiner}

    def __call__(self, weights: str = "ema") -> LoadedPolicy:
        base = load_policy(self.base, weights)
        refiner = REFINERS.load(self.refiner, weights)
        policy = RefinedPolicy(base, refiner).eval()
        loaded = "+".join(sorted({base.weights, refiner.weights}))
        label = refiner.method_label(base_label(base.name))
        return LoadedPolicy(policy, label, base.name, refiner.name, loaded)


def policy_loader(base: str | Path, refiner: str | Path | None = None) -> PolicyLoader:
    """The loader of the base policy at ``base``, refined by the refiner at ``refiner`` if given."""
    if refiner is None:
        return BasePolicyLoader(str(base))
    return RefinedPolicyLoader(str(base), str(refiner))
