"""Diffusion Policy (``diffusion``) and DP3 (``dp3``, Diffusion Policy on point clouds).

A :class:`~difftori.base_policies.unet1d.ConditionalUnet1D` denoises the normalised action window
(B, H, Da), FiLM-conditioned on the encoded observation frames. Training uses diffusers' DDPM
scheduler, inference its DDIM scheduler (``num_inference_steps``, default 10). The EMA of the
weights is kept by the trainer and saved beside the raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from difftori.base_policies.base import BasePolicy, Generators, Obs, PolicyConfig, ShapeMeta, randn
from difftori.base_policies.registry import register
from difftori.base_policies.unet1d import ConditionalUnet1D
from diffusers import DDIMScheduler, DDPMScheduler
from torch.nn import functional as F


@dataclass(frozen=True)
class DiffusionConfig(PolicyConfig):
    """Defaults sized for a CPU; the paper's U-Net is ``down_dims=(512, 1024, 2048)``."""

    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 128
    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # or "sample"
    clip_sample: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {self.prediction_type!r}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError("need 1 <= num_inference_steps <= num_train_timesteps")


@register
class DiffusionPolicy(BasePolicy):
    """Diffusion Policy on images (+ ``agent_pos``) or, without images, on the low-dim ``state``."""

    name = "diffusion"
    config_cls = DiffusionConfig

    def __init__(self, config: DiffusionConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        self.model = ConditionalUnet1D(
            shape_meta.action_dim,
            self.obs_encoder.out_dim,
            config.down_dims,
            config.kernel_size,
            config.n_groups,
            config.step_embed_dim,
        )
        sched = dict(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample,
            prediction_type=config.prediction_type,
        )
        self.train_scheduler = DDPMScheduler(**sched)
        self.sample_scheduler = DDIMScheduler(**sched)

    @classmethod
    def default_obs_keys(cls, shape_meta: ShapeMeta) -> tuple[str, ...]:
        images = sorted(k for k, v in shape_meta.obs.items() if v["kind"] == "image")
        if images:
            return (*images, *(["agent_pos"] if "agent_pos" in shape_meta.obs else []))
        if "state" in shape_meta.obs:
            return ("state",)
        return tuple(sorted(k for k, v in shape_meta.obs.items() if v["kind"] == "lowdim"))

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        cond = self.encode_obs(batch["obs"])
        action = self.normalizer.normalize("action", batch["action"])
        noise = torch.randn_like(action)
        t = torch.randint(0, self.config.num_train_timesteps, (action.shape[0],), device=action.device)
        pred = self.model(self.train_scheduler.add_noise(action, noise, t), t, cond)
        target = noise if self.config.prediction_type == "epsilon" else action
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def predict_action_chunk(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        cond = self.encode_obs(obs)
        x = randn(
            cond.shape[0], self.horizon, self.shape_meta.action_dim, generator=generator, device=cond.device
        )
        sched = self.sample_scheduler
        sched.set_timesteps(self.config.num_inference_steps)
        gen = generator if generator is None or isinstance(generator, torch.Generator) else list(generator)
        for t in sched.timesteps:  # DDIM with eta = 0 draws nothing more; diffusers takes a list per sample
            x = sched.step(self.model(x, t, cond), t, x, generator=gen).prev_sample
        return self.normalizer.unnormalize("action", x)


@dataclass(frozen=True)
class DP3Config(DiffusionConfig):
    prediction_type: str = "sample"  # DP3's setting


@register
class DP3Policy(DiffusionPolicy):
    """DP3: Diffusion Policy with the point-cloud encoder on ``point_cloud`` + ``agent_pos``."""

    name = "dp3"
    config_cls = DP3Config

    @classmethod
    def default_obs_keys(cls, shape_meta: ShapeMeta) -> tuple[str, ...]:
        return ("point_cloud", "agent_pos")
