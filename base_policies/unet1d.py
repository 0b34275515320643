"""A 1-D temporal U-Net over action sequences, conditioned by FiLM (Diffusion Policy's design).

Input ``(B, T, Da)`` noisy actions, a diffusion timestep per sample and a global condition
(observation features); output ``(B, T, Da)``. Every residual block modulates its features with a
per-channel scale and bias computed from ``[timestep embedding, global condition]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int) -> None:
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out), nn.Mish()
        )


class FiLMResBlock(nn.Module):
    """Two conv blocks; the first one's output is scaled and shifted by FiLM from the condition."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel, groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        return self.block2(scale * self.block1(x) + bias) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """U-Net over time with ``len(down_dims)`` levels; FiLM-conditioned on timestep + ``cond``."""

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: Sequence[int] = (64, 128, 256),
        kernel: int = 5,
        groups: int = 8,
        step_embed_dim: int = 128,
    ) -> None:
        super().__init__()
        self.step_emb = nn.Sequential(
            SinusoidalPosEmb(step_embed_dim),
            nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim),
        )
        c = step_embed_dim + cond_dim
        dims = [action_dim, *down_dims]
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = i == len(down_dims) - 1
            self.down.append(
                nn.ModuleList(
                    [
                        FiLMResBlock(a, b, c, kernel, groups),
                        FiLMResBlock(b, b, c, kernel, groups),
                        nn.Conv1d(b, b, 3, stride=2, padding=1) if not last else nn.Identity(),
                    ]
                )
            )
        mid = down_dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, c, kernel, groups) for _ in range(2)])
        self.up = nn.ModuleList()
        rev = list(down_dims[::-1])
        for a, b in zip(rev[:-1], rev[1:], strict=True):  # one upsample per downsample
            self.up.append(
                nn.ModuleList(
                    [
                        FiLMResBlock(2 * a, b, c, kernel, groups),
                        FiLMResBlock(b, b, c, kernel, groups),
                        nn.ConvTranspose1d(b, b, 4, stride=2, padding=1),
                    ]
                )
            )
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel, groups))
        self.out = nn.Conv1d(down_dims[0], action_dim, 1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, Da), ``timestep`` (B,) or scalar, ``cond`` (B, cond_dim) -> (B, T, Da)."""
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        c = torch.cat([self.step_emb(timestep), cond], dim=-1)
        h = x.transpose(1, 2)
        skips = []  # the finest level's skip is not used (as in Diffusion Policy)
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, c), c))
        return self.out(self.final(h)).transpose(1, 2)
