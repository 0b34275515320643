"""Observation encoders shared by every policy and refiner (each written once).

* point cloud: DP3's encoder - per-point MLP 3-64-128-256 with LayerNorm, max-pool, projection to 64;
* low-dim: an MLP (DP3's ``agent_pos`` MLP 64-64);
* image: a small ResNet-style CNN with GroupNorm and random-crop augmentation (no torchvision).

:class:`ObsEncoder` encodes each of the ``To`` observation frames with the encoders its keys need
and concatenates everything to one feature vector per sample, ``(B, To * frame_dim)``.
Observations reaching an encoder are already normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def mlp(
    sizes: Sequence[int], layer_norm: bool = False, last_act: bool = True, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` (and LayerNorm) between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            if layer_norm:
                layers.append(nn.LayerNorm(b))
            layers.append(act())
    return nn.Sequential(*layers)


class PointNetEncoder(nn.Module):
    """DP3's point-cloud encoder: shared per-point MLP with LayerNorm, max-pool, linear + LayerNorm."""

    def __init__(self, in_channels: int = 3, hidden: Sequence[int] = (64, 128, 256), out_dim: int = 64):
        super().__init__()
        self.point_mlp = mlp([in_channels, *hidden], layer_norm=True)
        self.proj = nn.Sequential(nn.Linear(hidden[-1], out_dim), nn.LayerNorm(out_dim))
        self.out_dim = out_dim

    def forward(self, points: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, out_dim)
        return self.proj(self.point_mlp(points).max(dim=1).values)


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


class ImageEncoder(nn.Module):
    """Small ResNet-style CNN: strided stem, residual stages with GroupNorm, average pool, linear.

    Training applies a random crop of ``crop_ratio`` of the image; evaluation a centre crop.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        out_dim: int = 64,
        groups: int = 8,
        crop_ratio: float = 0.9,
    ) -> None:
        super().__init__()
        self.crop_ratio = crop_ratio
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
            nn.GroupNorm(groups, widths[0]),
            nn.ReLU(),
        ]
        for i, w in enumerate(widths):
            if i > 0:
                layers += [
                    nn.Conv2d(widths[i - 1], w, 3, stride=2, padding=1, bias=False),
                    nn.GroupNorm(groups, w),
                    nn.ReLU(),
                ]
            layers.append(ResBlock(w, groups))
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(widths[-1], out_dim)
        self.out_dim = out_dim

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw = max(1, round(h * self.crop_ratio)), max(1, round(w * self.crop_ratio))
        if self.training:
            i = int(torch.randint(0, h - ch + 1, ()).item())
            j = int(torch.randint(0, w - cw + 1, ()).item())
        else:
            i, j = (h - ch) // 2, (w - cw) // 2
        return x[..., i : i + ch, j : j + cw]

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.proj(self.net(self.crop(image)))


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the observation encoders (defaults: DP3's encoder)."""

    point_hidden: tuple[int, ...] = (64, 128, 256)
    point_out: int = 64
    lowdim_hidden: tuple[int, ...] = (64, 64)
    image_widths: tuple[int, ...] = (32, 64, 128)
    image_out: int = 64
    image_crop_ratio: float = 0.9


class ObsEncoder(nn.Module):
    """Encodes ``{key: (B, To, ...)}`` to ``(B, To * frame_dim)``.

    One encoder per point-cloud key and per image key; all low-dim keys are concatenated and go
    through one MLP. ``kinds`` maps each used key to ``point_cloud``, ``image`` or ``lowdim`` and
    ``shapes`` gives each key's per-step shape.
    """

    def __init__(
        self,
        kinds: dict[str, str],
        shapes: dict[str, tuple[int, ...]],
        n_obs_steps: int,
        config: EncoderConfig | None = None,
    ) -> None:
        super().__init__()
        cfg = config or EncoderConfig()
        self.n_obs_steps = n_obs_steps
        self.lowdim_keys = sorted(k for k, kind in kinds.items() if kind == "lowdim")
        self.encoders = nn.ModuleDict()
        for key in sorted(kinds):
            if kinds[key] == "point_cloud":
                self.encoders[key] = PointNetEncoder(shapes[key][-1], cfg.point_hidden, cfg.point_out)
            elif kinds[key] == "image":
                self.encoders[key] = ImageEncoder(
                    shapes[key][0], cfg.image_widths, cfg.image_out, crop_ratio=cfg.image_crop_ratio
                )
        self.lowdim = None
        if self.lowdim_keys:
            dim = sum(shapes[k][-1] for k in self.lowdim_keys)
            self.lowdim = mlp([dim, *cfg.lowdim_hidden])
        self.frame_dim = sum(e.out_dim for e in self.encoders.values()) + (
            cfg.lowdim_hidden[-1] if self.lowdim is not None else 0
        )
        self.out_dim = self.frame_dim * n_obs_steps

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        b, to = next(iter(obs.values())).shape[:2]
        if to != self.n_obs_steps:
            raise ValueError(f"expected {self.n_obs_steps} observation steps, got {to}")
        feats = [enc(obs[k].flatten(0, 1)) for k, enc in self.encoders.items()]
        if self.lowdim is not None:
            feats.append(self.lowdim(torch.cat([obs[k].flatten(0, 1) for k in self.lowdim_keys], -1)))
        return torch.cat(feats, dim=-1).reshape(b, to * self.frame_dim)
