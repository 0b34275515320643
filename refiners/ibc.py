"""IBC refiner (``ibc``): Implicit Behavioral Cloning (Florence et al. 2021) on action windows.

An energy model E(observation features, window) over the flat normalised window (H x Da dims, the
box [-1, 1] being the data's min/max), trained with InfoNCE: the expert window against
``uniform_negatives`` counter-examples uniform in the box (IBC's), plus, for IBC + base only,
``perturbed_negatives`` copies of the item's base window with N(0, ``negative_noise``^2) noise
(an option outside the IBC paper; 0 by default and required to be 0 with ``init="uniform"``).

Inference is IBC's derivative-free optimiser (the paper's Appendix, Algorithm 1; the official
``iterative_dfo``): ``dfo_samples`` candidates; ``dfo_iterations`` rounds of evaluating E, and
between rounds resampling with replacement from softmax(-E) (temperature 1), adding N(0, sigma^2)
noise and clipping to the box, sigma starting at ``dfo_noise`` and shrinking by ``dfo_shrink``; the
lowest-energy candidate of the last round is returned (the argmax of the last softmax). Candidates
start uniform in the box (``init="uniform"``: IBC alone, the paper's) or, for IBC + base
(``init="base"``, the DiffTORI paper's "IBC + Diffusion"), around the base window with std
``dfo_noise``, clipped to the box.

With ``init="uniform"`` neither ``compute_loss`` nor ``refine`` reads the base window (the batch's
``init_action``, ``refine``'s ``init_action``): IBC alone is IBC.

Deviations from the IBC paper / official code: the box is the data's min/max without the official
0.05 boundary buffer; one InfoNCE loss without gradient penalty and no Langevin option; the energy
is an MLP on [features, window] (early fusion; its first layer applied to the features once per
item); the optional perturbed-base negatives above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from difftori.base_policies.base import Generators, Obs, ShapeMeta, multinomial, rand, randn
from difftori.base_policies.encoders import mlp
from difftori.datasets.episode_store import ACTION_KEY
from difftori.refiners.base import REFINERS, Refiner, RefinerConfig
from torch.nn import functional as F

IBC_NOISE = 0.33  # the paper's initial DFO sigma (normalised units), for init "uniform"
BASE_NOISE = 0.1  # candidates' spread around the base window and initial sigma, for init "base"
# Default DFO candidates per init. Measured with benchmarks/ibc_dfo.py (16-D window, 3 iterations,
# quadratic energy of scale 0.1, 64 trials; latency: refine at batch 1, 1 CPU thread):
#   uniform: 256 -> |a - a*| 1.01 (1.9 ms), 1024 -> 0.79 (4.5 ms), 4096 -> 0.58 (16 ms),
#            16384 -> 0.44 (105-160 ms); still improving, so the paper's 16384.
#   base (base window 0.59 away): 256 -> 0.30 (1.6 ms), 1024 -> 0.24 (4.5 ms), 4096 -> 0.21,
#            16384 -> 0.18; 256 already halves the base's error, more buys little.
DFO_SAMPLES = {"uniform": 16384, "base": 256}


@dataclass(frozen=True)
class IBCConfig(RefinerConfig):
    hidden: tuple[int, ...] = (256, 256)
    uniform_negatives: int = 64  # IBC's counter-examples, uniform in the box
    # IBC + base only (must be 0 with init "uniform"): base window + N(0, negative_noise^2) negatives.
    perturbed_negatives: int = 0
    negative_noise: float = 0.1
    init: str = "base"  # "base" (IBC + base) or "uniform" (IBC alone)
    dfo_samples: int | None = None  # DFO candidates; None: DFO_SAMPLES[init]
    dfo_iterations: int = 3  # energy evaluations (the paper's N_iters)
    dfo_noise: float | None = None  # initial sigma; None: 0.33 (IBC's) for uniform, 0.1 for base
    dfo_shrink: float = 0.5

    def __post_init__(self) -> None:
        if self.init not in ("base", "uniform"):
            raise ValueError(f"init must be 'base' or 'uniform', got {self.init!r}")
        if self.init == "uniform" and self.perturbed_negatives != 0:
            raise ValueError(
                f"perturbed_negatives must be 0 with init 'uniform' (IBC alone never reads the base "
                f"window), got {self.perturbed_negatives}"
            )
        if self.dfo_iterations < 1 or (self.dfo_samples is not None and self.dfo_samples < 1):
            raise ValueError("dfo_iterations and dfo_samples must be >= 1")

    @property
    def dfo_candidates(self) -> int:
        """DFO candidates: ``dfo_samples``, or the measured default for ``init``."""
        return self.dfo_samples if self.dfo_samples is not None else DFO_SAMPLES[self.init]

    @property
    def dfo_sigma(self) -> float:
        """Initial DFO sigma: ``dfo_noise``, or 0.33 (uniform) / 0.1 (base)."""
        if self.dfo_noise is not None:
            return self.dfo_noise
        return IBC_NOISE if self.init == "uniform" else BASE_NOISE


Energy = Callable[[torch.Tensor], torch.Tensor]  # (B, N, D) candidates -> (B, N) energies


def dfo(
    energy: Energy,
    samples: torch.Tensor,
    iterations: int,
    noise: float,
    shrink: float,
    generator: Generators = None,
) -> torch.Tensor:
    """IBC's derivative-free optimiser from candidates (B, N, D) in the box [-1, 1] (the paper's
    Algorithm 1, see the module docstring). Returns (B, D): the last round's lowest-energy candidate."""
    b, n, d = samples.shape
    for it in range(iterations):
        energies = energy(samples)
        if it == iterations - 1:
            break
        idx = multinomial(F.softmax(-energies, dim=-1), n, generator)
        samples = torch.gather(samples, 1, idx.unsqueeze(-1).expand(-1, -1, d))
        samples = samples + noise * randn(b, n, d, generator=generator, device=samples.device)
        samples = samples.clamp(-1, 1)
        noise *= shrink
    return samples[torch.arange(b, device=samples.device), energies.argmin(dim=-1)]


@REFINERS.register
class IBCRefiner(Refiner):
    name = "ibc"
    label = "IBC"

    def method_label(self, base_label: str) -> str:
        """``IBC + <base>``; IBC alone never reads the base but is trained and run on its window
        (horizon, executed steps), so its row names the base whose window it uses: two bases
        in one table give two IBC-alone rows, never one label for two different models."""
        return f"IBC (window of {base_label})" if self.config.init == "uniform" else f"IBC + {base_label}"

    @property
    def uses_base(self) -> bool:
        return self.config.init != "uniform"

    config_cls = IBCConfig

    def __init__(self, config: IBCConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        self.energy_net = mlp([self.obs_encoder.out_dim + self.chunk_dim, *config.hidden, 1], last_act=False)

    def energy(self, feats: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Energies (B, N) of N candidate windows (B, N, D) under observation features (B, F)."""
        first = self.energy_net[0]  # the first layer on [feats, window], split: feats once per item
        w_feats, w_act = first.weight.split([feats.shape[-1], actions.shape[-1]], dim=1)
        h = F.linear(feats, w_feats, first.bias).unsqueeze(1) + actions @ w_act.T
        return self.energy_net[1:](h).squeeze(-1)

    def counter_examples(self, batch: dict[str, Any], b: int, d: int, device: Any) -> torch.Tensor:
        """(B, uniform_negatives + perturbed_negatives, D) InfoNCE negatives (global RNG); the base
        window (``pick_init``) is read only when ``perturbed_negatives`` > 0."""
        c = self.config
        negatives = [torch.rand(b, c.uniform_negatives, d, device=device) * 2 - 1]
        if c.perturbed_negatives > 0:
            base = self.to_flat(self.pick_init(batch)).unsqueeze(1)
            noise = torch.randn(b, c.perturbed_negatives, d, device=device)
            negatives.append(base + c.negative_noise * noise)
        return torch.cat(negatives, dim=1)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        feats = self.encode_obs(batch["obs"])
        expert = self.to_flat(batch[ACTION_KEY])
        b, d = expert.shape
        negatives = self.counter_examples(batch, b, d, expert.device)
        logits = -self.energy(feats, torch.cat([expert.unsqueeze(1), negatives], dim=1))
        return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=expert.device))

    @torch.no_grad()
    def refine(self, obs: Obs, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        c = self.config
        feats = self.encode_obs(obs)
        b, n, d = feats.shape[0], c.dfo_candidates, self.chunk_dim
        dev = feats.device
        if c.init == "uniform":  # IBC alone: init_action is never read
            samples = rand(b, n, d, generator=generator, device=dev) * 2 - 1
        else:
            noise = c.dfo_sigma * randn(b, n, d, generator=generator, device=dev)
            samples = (self.to_flat(init_action).unsqueeze(1) + noise).clamp(-1, 1)
        energy = lambda a: self.energy(feats, a)  # noqa: E731
        return self.from_flat(dfo(energy, samples, c.dfo_iterations, c.dfo_sigma, c.dfo_shrink, generator))
