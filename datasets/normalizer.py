"""Per-key min/max normalisation to [-1, 1], owned by a policy and saved with its weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_EPS = 1e-6


class Normalizer(nn.Module):
    """Affine map of each key's last dimension from its [min, max] to [-1, 1].

    Low-dim keys, point clouds and actions are fitted from data; ``image`` keys (uint8) use the
    fixed map [0, 255] -> [-1, 1]. A dimension that never varies maps to 0. The statistics are
    buffers, so they travel in the policy's state dict (and its safetensors file).
    """

    def __init__(self, dims: dict[str, int], images: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.keys = tuple(sorted(dims))
        self.images = tuple(images)
        for key, dim in dims.items():
            self.register_buffer(f"{key}__low", -torch.ones(dim))
            self.register_buffer(f"{key}__high", torch.ones(dim))

    def fit(self, data: dict[str, np.ndarray]) -> Normalizer:
        """Set each key's min/max from ``data[key]`` (any leading shape, last dim = features)."""
        for key in self.keys:
            if key not in data:
                raise KeyError(f"normalizer: no data for key '{key}' (have {sorted(data)})")
            flat = np.asarray(data[key], dtype=np.float64).reshape(-1, data[key].shape[-1])
            getattr(self, f"{key}__low").copy_(torch.from_numpy(flat.min(axis=0)))
            getattr(self, f"{key}__high").copy_(torch.from_numpy(flat.max(axis=0)))
        return self

    def set_identity(self, keys: tuple[str, ...]) -> None:
        """Map ``keys`` as they are ([-1, 1] to [-1, 1]), e.g. for an imported policy's actions."""
        for key in keys:
            getattr(self, f"{key}__low").fill_(-1.0)
            getattr(self, f"{key}__high").fill_(1.0)

    def set_mean_std(self, stats: dict[str, dict[str, object]]) -> None:
        """Map each key to ``(x - mean) / std`` (robomimic's observation normalisation): the
        [mean - std, mean + std] interval goes to [-1, 1]."""
        for key, st in stats.items():
            mean = torch.as_tensor(np.asarray(st["mean"], dtype=np.float64).reshape(-1))
            std = torch.as_tensor(np.asarray(st["std"], dtype=np.float64).reshape(-1))
            getattr(self, f"{key}__low").copy_(mean - std)
            getattr(self, f"{key}__high").copy_(mean + std)

    def _affine(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = getattr(self, f"{key}__low"), getattr(self, f"{key}__high")
        span = high - low
        scale = torch.where(span > _EPS, 2.0 / span.clamp_min(_EPS), torch.ones_like(span))
        offset = torch.where(span > _EPS, -1.0 - low * scale, -low)
        return scale, offset

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key in self.images:
            return x.float() / 127.5 - 1.0
        scale, offset = self._affine(key)
        return x.float() * scale + offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key in self.images:
            return (x + 1.0) * 127.5
        scale, offset = self._affine(key)
        return (x - offset) / scale
