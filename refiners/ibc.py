"""IBC refiner (``ibc``): an energy model E(observation features, window) trained with InfoNCE.

Counter-examples per item: ``uniform_negatives`` windows uniform in the normalised action box
[-1, 1] and ``perturbed_negatives`` base windows plus Gaussian noise (``negative_noise``).
Inference is IBC's derivative-free optimiser: ``dfo_samples`` candidates, then ``dfo_iterations``
rounds of softmax(-E) resampling plus noise that shrinks by ``dfo_shrink``; the lowest-energy
candidate is returned. Candidates start uniform in the box (``init="uniform"``: IBC alone) or
around the base window (``init="base"``: IBC + base, noise ``dfo_noise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from difftori.base_policies.base import Generators, Obs, ShapeMeta, multinomial, rand, randn
from difftori.base_policies.encoders import mlp
from difftori.datasets.episode_store import ACTION_KEY
from difftori.refiners.base import REFINERS, Refiner, RefinerConfig
from torch.nn import functional as F


@dataclass(frozen=True)
class IBCConfig(RefinerConfig):
    hidden: tuple[int, ...] = (256, 256)
    uniform_negatives: int = 64
    perturbed_negatives: int = 64
    negative_noise: float = 0.1
    init: str = "base"  # "base" (IBC + base) or "uniform" (IBC alone)
    dfo_samples: int = 256
    dfo_iterations: int = 3
    dfo_noise: float = 0.1
    dfo_shrink: float = 0.5

    def __post_init__(self) -> None:
        if self.init not in ("base", "uniform"):
            raise ValueError(f"init must be 'base' or 'uniform', got {self.init!r}")


@REFINERS.register
class IBCRefiner(Refiner):
    name = "ibc"
    label = "IBC"

    def method_label(self, base_label: str) -> str:
        return "IBC" if self.config.init == "uniform" else f"IBC + {base_label}"

    config_cls = IBCConfig

    def __init__(self, config: IBCConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        self.energy_net = mlp([self.obs_encoder.out_dim + self.chunk_dim, *config.hidden, 1], last_act=False)

    def energy(self, feats: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Energies (B, N) of N candidate windows (B, N, D) under observation features (B, F)."""
        f = feats.unsqueeze(1).expand(-1, actions.shape[1], -1)
        return self.energy_net(torch.cat([f, actions], dim=-1)).squeeze(-1)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        c = self.config
        feats = self.encode_obs(batch["obs"])
        expert = self.to_flat(batch[ACTION_KEY])
        b, d = expert.shape
        uniform = torch.rand(b, c.uniform_negatives, d, device=expert.device) * 2 - 1
        base = self.to_flat(self.pick_init(batch)).unsqueeze(1)
        perturbed = base + c.negative_noise * torch.randn(b, c.perturbed_negatives, d, device=expert.device)
        candidates = torch.cat([expert.unsqueeze(1), uniform, perturbed], dim=1)
        logits = -self.energy(feats, candidates)
        return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=expert.device))

    @torch.no_grad()
    def refine(self, obs: Obs, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        c = self.config
        feats = self.encode_obs(obs)
        b, n, d = feats.shape[0], c.dfo_samples, self.chunk_dim
        dev = feats.device
        if c.init == "base":
            noise = c.dfo_noise * randn(b, n, d, generator=generator, device=dev)
            samples = self.to_flat(init_action).unsqueeze(1) + noise
        else:
            samples = rand(b, n, d, generator=generator, device=dev) * 2 - 1
        noise = c.dfo_noise if c.init == "base" else 0.33
        for _ in range(c.dfo_iterations):
            probs = F.softmax(-self.energy(feats, samples), dim=-1)
            idx = multinomial(probs, n, generator)
            samples = torch.gather(samples, 1, idx.unsqueeze(-1).expand(-1, -1, d))
            samples = (samples + noise * randn(b, n, d, generator=generator, device=dev)).clamp(-1, 1)
            noise *= c.dfo_shrink
        best = self.energy(feats, samples).argmin(dim=-1)
        return self.from_flat(samples[torch.arange(b, device=dev), best])
