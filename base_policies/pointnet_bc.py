"""PointNet-BC (``pointnet_bc``): the point-cloud encoder and an MLP head regressing the action
window, trained with MSE (ManiSkill's strongest baseline in the DiffTORI paper)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from difftori.base_policies.base import BasePolicy, Generators, Obs, PolicyConfig, ShapeMeta
from difftori.base_policies.encoders import mlp
from difftori.base_policies.registry import register
from torch.nn import functional as F


@dataclass(frozen=True)
class PointNetBCConfig(PolicyConfig):
    hidden: tuple[int, ...] = (256, 256)


@register
class PointNetBC(BasePolicy):
    name = "pointnet_bc"
    config_cls = PointNetBCConfig

    def __init__(self, config: PointNetBCConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        out = config.horizon * shape_meta.action_dim
        self.head = mlp([self.obs_encoder.out_dim, *config.hidden, out], last_act=False)

    @classmethod
    def default_obs_keys(cls, shape_meta: ShapeMeta) -> tuple[str, ...]:
        return ("point_cloud", "agent_pos")

    def _forward(self, obs: Obs) -> torch.Tensor:
        return self.head(self.encode_obs(obs)).view(-1, self.horizon, self.shape_meta.action_dim)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return F.mse_loss(self._forward(batch["obs"]), self.normalizer.normalize("action", batch["action"]))

    @torch.no_grad()
    def predict_action_chunk(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        return self.normalizer.unnormalize("action", self._forward(obs))
