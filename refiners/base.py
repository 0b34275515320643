"""The Refiner contract and the composite RefinedPolicy.

A refiner improves a base policy's action window at test time:

* ``refine(obs, init_action) -> (B, H, Da)``: ``obs`` as for base policies ``{key: (B, To, ...)}``,
  ``init_action`` the base policy's window (B, H, Da) in env units; returns a window in env units;
* ``compute_loss(batch)``: ``batch = {"obs", "action": (B, H, Da) expert window,
  "init_action": (B, K, H, Da) K stored base samples}`` (from ``difftori init-actions``);
* ``validation_metrics(batch)``: loss, MSE of refined and of initial windows to the expert.

``generator`` is one generator or one per sample, as for base policies (draw through
``difftori.base_policies.base.randn``/``rand``/``multinomial``).

A refiner owns its normaliser and observation encoder (it does not share the base's weights).
:class:`RefinedPolicy` wraps (base, refiner) behind the BasePolicy contract, so evaluation treats
refined and plain policies alike; after each call it exposes ``last_action_shift``, how far the
refiner moved the executed actions (evaluation records it without importing refiners). A refiner
that never reads the base window (``uses_base`` False, e.g. IBC alone) is run without the base.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from difftori.base_policies.base import BasePolicy, Generators, Obs, ObsConditioned, ShapeMeta
from difftori.base_policies.encoders import EncoderConfig
from difftori.base_policies.registry import Registry
from difftori.datasets.episode_store import ACTION_KEY
from torch.nn import functional as F

REFINERS = Registry("refiner", "refiner")


@dataclass(frozen=True)
class RefinerConfig:
    """Fields every refiner has. ``horizon``/``n_obs_steps``/``n_action_steps`` are the base
    policy's (train-refiner copies them); empty ``obs_keys`` means the refiner's default keys."""

    obs_keys: tuple[str, ...] = ()
    horizon: int = 4
    n_obs_steps: int = 2
    n_action_steps: int = 3
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Training only: Gaussian noise (std, normalised action units) added to the stored base window,
    # so the refiner also learns from starts worse than the base's on its own training episodes.
    init_noise: float = 0.0


class Refiner(ObsConditioned):
    kind = "refiner"
    config_cls: ClassVar[type[RefinerConfig]] = RefinerConfig
    label: ClassVar[str] = ""  # the method's name in result tables

    def method_label(self, base_label: str) -> str:
        """Row label in result tables, e.g. ``Residual + DP3``."""
        return f"{self.label} + {base_label}"

    @property
    def uses_base(self) -> bool:
        """Whether ``refine`` reads the base window's values (False: IBC alone, DiffTORI from zero or
        random starts without an anchor); ``RefinedPolicy`` then does not run the base policy."""
        return True

    def __init__(self, config: RefinerConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta, config.n_obs_steps)
        self.chunk_dim = config.horizon * shape_meta.action_dim

    def reset(self) -> None:
        """Clear per-episode state at an episode start (the registered refiners have none)."""

    @classmethod
    def default_obs_keys(cls, shape_meta: ShapeMeta) -> tuple[str, ...]:
        """Point cloud + agent_pos when present (DP3's observation), else every low-dim key."""
        if "point_cloud" in shape_meta.obs:
            return ("point_cloud", *(["agent_pos"] if "agent_pos" in shape_meta.obs else []))
        return tuple(sorted(k for k, v in shape_meta.obs.items() if v["kind"] != "point_cloud"))

    # -- normalised flat action windows ---------------------------------------------------------
    def to_flat(self, action: torch.Tensor) -> torch.Tensor:
        """(..., H, Da) env units -> (..., H*Da) normalised."""
        return self.normalizer.normalize(ACTION_KEY, action).flatten(-2)

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """(..., H*Da) normalised -> (..., H, Da) env units."""
        shape = (*flat.shape[:-1], self.config.horizon, self.shape_meta.action_dim)
        return self.normalizer.unnormalize(ACTION_KEY, flat.reshape(shape))

    def pick_init(self, batch: dict[str, Any]) -> torch.Tensor:
        """One of the K stored base samples per training item, at random (global RNG, seeded),
        plus ``config.init_noise`` Gaussian noise in normalised units when set."""
        init = batch["init_action"]
        k = torch.randint(0, init.shape[1], (init.shape[0],), device=init.device)
        init = init[torch.arange(init.shape[0], device=init.device), k]
        if self.config.init_noise > 0:
            flat = self.to_flat(init)
            init = self.from_flat(flat + self.config.init_noise * torch.randn_like(flat))
        return init

    # -- the contract ---------------------------------------------------------------------------
    @abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor: ...

    @abstractmethod
    def refine(self, obs: Obs, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """(B, H, Da) refined window in env units."""

    def validation_metrics(self, batch: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator(device=batch["action"].device).manual_seed(seed)
        init = batch["init_action"][:, 0]
        with torch.no_grad():
            refined = self.refine(batch["obs"], init, gen)
        expert = batch["action"].float()
        return {
            "loss": self.compute_loss(batch),
            "action_mse": F.mse_loss(refined, expert),
            "init_action_mse": F.mse_loss(init, expert),
        }


class RefinedPolicy(torch.nn.Module):
    """(base, refiner) behind the inference half of the BasePolicy contract (``predict_action``,
    ``predict_action_chunk``, ``reset``, window sizes), so evaluation treats refined and plain
    policies alike. Train the two parts separately.

    ``last_action_shift`` (None before the first call, and without a base):
    ``{"mean": (B,), "max": (B,)}``, the mean and the max absolute difference, in env units,
    between the base and the refined window over the executed actions (window steps
    ``n_obs_steps - 1 ..``, ``n_action_steps`` of them) of the last ``predict_action``/
    ``predict_action_chunk`` call, per sample.
    """

    def __init__(self, base: BasePolicy, refiner: Refiner) -> None:
        super().__init__()
        if (refiner.config.horizon, refiner.config.n_obs_steps) != (base.horizon, base.n_obs_steps):
            raise ValueError(
                f"refiner windows (H={refiner.config.horizon}, To={refiner.config.n_obs_steps}) differ "
                f"from the base policy's (H={base.horizon}, To={base.n_obs_steps})"
            )
        self.base, self.refiner = base, refiner
        self.name = f"{refiner.name}+{base.name}"
        self.horizon, self.n_obs_steps, self.n_action_steps = (
            base.horizon,
            base.n_obs_steps,
            base.n_action_steps,
        )
        self.obs_keys = tuple(dict.fromkeys((*base.obs_keys, *refiner.obs_keys)))
        self.last_action_shift: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def predict_action_chunk(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        if not self.refiner.uses_base:  # a NaN window of the right shape: it is never read
            first = next(iter(obs.values()))
            shape = (first.shape[0], self.horizon, self.refiner.shape_meta.action_dim)
            self.last_action_shift = None
            return self.refiner.refine(obs, torch.full(shape, float("nan"), device=first.device), generator)
        init = self.base.predict_action_chunk(obs, generator)
        refined = self.refiner.refine(obs, init, generator)
        start = self.n_obs_steps - 1
        shift = (refined - init)[:, start : start + self.n_action_steps].abs().flatten(1)
        self.last_action_shift = {"mean": shift.mean(1), "max": shift.amax(1)}
        return refined

    def predict_action(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        start = self.n_obs_steps - 1
        return self.predict_action_chunk(obs, generator)[:, start : start + self.n_action_steps]

    @property
    def recurrent(self) -> bool:
        return self.base.recurrent

    def reset(self) -> None:
        """Start an episode: both parts clear their per-episode state."""
        self.base.reset()
        self.refiner.reset()
