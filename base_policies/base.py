"""The BasePolicy contract (diffusion_policy's narrow tensor interface).

* ``obs``: ``{key: (B, To, ...)}`` tensors in env units (uint8 images, float point clouds/low-dim);
* ``predict_action(obs) -> (B, Ta, Da)``: the actions to execute, in env units;
* ``predict_action_chunk(obs) -> (B, H, Da)``: the whole predicted window (steps ``t-To+1 ..
  t-To+H``, see :mod:`difftori.datasets.windows`); refiners start from it;
* ``compute_loss(batch) -> scalar``: ``batch = {"obs": ..., "action": (B, H, Da)}`` in env units;
* ``reset()`` before each episode.

Sampling takes ``generator``: one ``torch.Generator`` for the whole batch, or a sequence of them, one
per sample, so that a sample's draws do not depend on the other samples of its batch (evaluation
steps several episodes as one batch; each episode has its own seeded generator). Every draw at
inference goes through :func:`randn`, :func:`rand` or :func:`multinomial`, which implement both.

The policy owns its :class:`~difftori.datasets.normalizer.Normalizer` (fitted before training,
saved in its weights), so nothing outside a policy ever sees normalised values.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from difftori.base_policies.checkpoint import Checkpoint, CheckpointError, write_checkpoint
from difftori.base_policies.configs import config_to_dict
from difftori.base_policies.encoders import EncoderConfig, ObsEncoder
from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore
from difftori.datasets.normalizer import Normalizer
from torch import nn
from torch.nn import functional as F

Obs = dict[str, torch.Tensor]
# One generator for the batch, one per sample (sample i draws from generator i alone), or None.
Generators = torch.Generator | Sequence[torch.Generator] | None


def _per_sample(
    draw: Callable[..., torch.Tensor], batch: int, generator: Generators, device: Any
) -> torch.Tensor:
    """``draw(b, generator, device)`` for the batch, or per sample with a list of generators."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return draw(batch, generator, dev).to(device)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}")
    return torch.cat([draw(1, g, g.device) for g in generator]).to(device)


def randn(
    batch: int,
    *shape: int,
    generator: Generators = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(batch, *shape) standard normal draws; with a list of generators, row i is exactly what
    ``randn(1, *shape, generator=generator[i])`` draws (like diffusers' ``randn_tensor``)."""
    return _per_sample(
        lambda b, g, d: torch.randn((b, *shape), generator=g, device=d, dtype=dtype), batch, generator, device
    )


def rand(
    batch: int,
    *shape: int,
    generator: Generators = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(batch, *shape) uniform [0, 1) draws, per sample as :func:`randn`."""
    return _per_sample(
        lambda b, g, d: torch.rand((b, *shape), generator=g, device=d, dtype=dtype), batch, generator, device
    )


def multinomial(probs: torch.Tensor, n: int, generator: Generators = None) -> torch.Tensor:
    """(B, n) indices drawn with replacement from each row of ``probs`` (B, K), per sample as
    :func:`randn`."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, n, replacement=True, generator=generator)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {probs.shape[0]}")
    rows = [
        torch.multinomial(probs[i : i + 1], n, replacement=True, generator=g) for i, g in enumerate(generator)
    ]
    return torch.cat(rows)


@dataclass(frozen=True)
class ShapeMeta:
    """Per-step shape and kind of each observation key, and the action dimension."""

    obs: dict[str, dict[str, Any]]  # key -> {"shape": [...], "kind": "point_cloud" | "image" | "lowdim"}
    action_dim: int

    @classmethod
    def from_store(cls, store: EpisodeStore) -> ShapeMeta:
        obs = {
            k: {"shape": list(store.array(k).shape[1:]), "kind": kind}
            for k, kind in store.meta.obs_kinds.items()
        }
        return cls(obs=obs, action_dim=store.meta.action_dim)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeMeta:
        return cls(obs=d["obs"], action_dim=int(d["action_dim"]))

    def to_dict(self) -> dict[str, Any]:
        return {"obs": self.obs, "action_dim": self.action_dim}


@dataclass(frozen=True)
class PolicyConfig:
    """Fields every base policy has. Empty ``obs_keys`` means the policy's default keys."""

    obs_keys: tuple[str, ...] = ()
    horizon: int = 4
    n_obs_steps: int = 2
    n_action_steps: int = 3
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self) -> None:
        if self.n_obs_steps < 1 or self.n_action_steps < 1:
            raise ValueError("n_obs_steps and n_action_steps must be >= 1")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"horizon {self.horizon} too short for n_obs_steps {self.n_obs_steps} "
                f"+ n_action_steps {self.n_action_steps} - 1"
            )


class ObsConditioned(nn.Module):
    """What every policy and refiner shares: chosen observation keys, a normaliser over them and
    the action, an observation encoder, and saving as a self-describing checkpoint."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # checkpoint kind: "base_policy" or "refiner"
    uses_obs_encoder: ClassVar[bool] = True  # False: the module brings its own (e.g. robomimic's)

    def __init__(self, config: Any, shape_meta: ShapeMeta, n_obs_steps: int) -> None:
        super().__init__()
        keys = tuple(config.obs_keys) or self.default_obs_keys(shape_meta)
        missing = [k for k in keys if k not in shape_meta.obs]
        if missing:
            raise ValueError(
                f"{self.name}: observation key '{missing[0]}' is not in the data "
                f"(available: {sorted(shape_meta.obs)})"
            )
        self.config = config
        self.shape_meta = shape_meta
        self.obs_keys = keys
        kinds = {k: shape_meta.obs[k]["kind"] for k in keys}
        shapes = {k: tuple(shape_meta.obs[k]["shape"]) for k in keys}
        images = tuple(k for k in keys if kinds[k] == "image")
        dims = {k: shapes[k][-1] for k in keys if k not in images} | {ACTION_KEY: shape_meta.action_dim}
        self.normalizer = Normalizer(dims, images=images)
        self.obs_encoder = (
            ObsEncoder(kinds, shapes, n_obs_steps, config.encoder) if self.uses_obs_encoder else None
        )
        self._n_obs_steps = n_obs_steps
        self.info: dict[str, Any] = {}
        self.weights = "raw"  # which weights are loaded: "raw" or "ema"

    @classmethod
    def default_obs_keys(cls, shape_meta: ShapeMeta) -> tuple[str, ...]:
        """Keys used when the config names none (the module's natural observation)."""
        return tuple(sorted(shape_meta.obs))

    def fit_normalizer(self, data: dict[str, np.ndarray]) -> None:
        """Fit min/max of every normalised key (observations and ``action``) from raw steps."""
        self.normalizer.fit({k: data[k] for k in self.normalizer.keys})

    def normalize_obs(self, obs: Obs, steps: int | None = None) -> Obs:
        """The module's observation keys, normalised, first ``steps`` (default ``n_obs_steps``) frames."""
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"{self.name}: observation key '{missing[0]}' missing from obs {sorted(obs)}")
        steps = steps or self._n_obs_steps
        return {k: self.normalizer.normalize(k, obs[k][:, :steps]) for k in self.obs_keys}

    def encode_obs(self, obs: Obs) -> torch.Tensor:
        """Normalise the module's observation keys and encode them to (B, To * frame_dim)."""
        return self.obs_encoder(self.normalize_obs(obs))

    def save(
        self,
        path: str | os.PathLike[str],
        ema_state: dict[str, torch.Tensor] | None = None,
        info: dict[str, Any] | None = None,
    ) -> Path:
        """Write a self-describing checkpoint directory (safetensors + config.json)."""
        config = config_to_dict(self.config) | {"obs_keys": list(self.obs_keys)}
        ckpt = Checkpoint(self.kind, self.name, config, self.shape_meta.to_dict(), info or self.info)
        weights = {"raw": self.state_dict()} | ({"ema": ema_state} if ema_state is not None else {})
        return write_checkpoint(path, ckpt, weights)


class BasePolicy(ObsConditioned, ABC):
    """A policy behind the contract above; subclasses register themselves by name."""

    kind = "base_policy"
    config_cls: ClassVar[type[PolicyConfig]] = PolicyConfig
    # Recurrent policies carry state from call to call within an episode: ``reset()`` starts an
    # episode, calls must follow the episode's steps in order, one batch row per episode.
    recurrent: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta, config.n_obs_steps)

    # -- the contract ---------------------------------------------------------------------------
    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def n_obs_steps(self) -> int:
        return self.config.n_obs_steps

    @property
    def n_action_steps(self) -> int:
        return self.config.n_action_steps

    @abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor: ...

    @abstractmethod
    def predict_action_chunk(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        """(B, H, Da) actions in env units for the window around the current step."""

    def predict_action(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        """(B, Ta, Da) actions to execute from the current step on, in env units."""
        start = self.n_obs_steps - 1
        return self.predict_action_chunk(obs, generator)[:, start : start + self.n_action_steps]

    def reset(self) -> None:
        """Clear per-episode state (none for these policies)."""

    @classmethod
    def import_file(cls, path: Path) -> BasePolicy:
        """A policy from a checkpoint file another project wrote (only some policies have one)."""
        raise CheckpointError(f"{path}: a {cls.name} checkpoint is a directory (config.json + safetensors)")

    def train_window(self) -> tuple[int, int]:
        """(horizon, n_obs_steps) of the training samples (``WindowDataset``): by default the
        inference window; a recurrent policy trains on longer sequences."""
        return self.horizon, self.n_obs_steps

    def validation_metrics(self, batch: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
        """Held-out loss and MSE (env units) of the predicted action window against the data."""
        gen = torch.Generator(device=batch["action"].device).manual_seed(seed)
        pred = self.predict_action_chunk(batch["obs"], gen)
        return {"loss": self.compute_loss(batch), "action_mse": F.mse_loss(pred, batch["action"].float())}
