"""Residual refiner (``residual``): a network on (observation features, base window) outputs a
delta added to the base window (normalised units); trained with MSE to the expert window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from difftori.base_policies.base import Generators, Obs, ShapeMeta
from difftori.base_policies.encoders import mlp
from difftori.datasets.episode_store import ACTION_KEY
from difftori.refiners.base import REFINERS, Refiner, RefinerConfig
from torch.nn import functional as F


@dataclass(frozen=True)
class ResidualConfig(RefinerConfig):
    hidden: tuple[int, ...] = (256, 256)


@REFINERS.register
class ResidualRefiner(Refiner):
    name = "residual"
    label = "Residual"
    config_cls = ResidualConfig

    def __init__(self, config: ResidualConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        self.net = mlp(
            [self.obs_encoder.out_dim + self.chunk_dim, *config.hidden, self.chunk_dim], last_act=False
        )
        torch.nn.init.zeros_(self.net[-1].weight)  # starts as the identity: refined = base
        torch.nn.init.zeros_(self.net[-1].bias)

    def _refine_flat(self, obs: Obs, init_flat: torch.Tensor) -> torch.Tensor:
        return init_flat + self.net(torch.cat([self.encode_obs(obs), init_flat], dim=-1))

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        refined = self._refine_flat(batch["obs"], self.to_flat(self.pick_init(batch)))
        return F.mse_loss(refined, self.to_flat(batch[ACTION_KEY]))

    def refine(self, obs: Obs, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return self.from_flat(self._refine_flat(obs, self.to_flat(init_action)))
