"""DiffTORI (``difftori``): a CVAE whose decoder is differentiable trajectory optimisation.

Encoder (training only): state features ``z_s = h_o(obs)`` (the shared observation encoder),
action features ``z_a = h_a(a*)`` of the expert window, and a fusing MLP
``h_l(z_s, z_a) -> (mu, log sigma^2)`` of a Gaussian posterior over ``z~`` (dim ``latent_dim``).

Decoder: starting from the base policy's window, Levenberg-Marquardt maximises

    sum_{l<H} gamma^l f(z~, z_l, a_l),    z_0 = proj(z_s),   z_{l+1} = z_l + d(z~, z_l, a_l)

over the planning actions a_0..a_{H-1}, with ``f = -||g(z~, z_l, a_l)||^2`` for a learned residual
vector ``g`` (``objective_dim`` entries): the least-squares residual is
``[sqrt(gamma^l) g_l]_l`` (+ ``sqrt(proximity_weight) (a - a_init)`` if set), so Gauss-Newton is well
posed, with no constant offset. Loss: ``MSE(a_0(theta), a*) + beta * KL(posterior || N(0, I))``.

Chunk <-> horizon: one planning action ``a_l`` is one whole action window of the base policy
(H_window x Da, normalised, flattened). ``a_0`` is the window being refined; for H > 1 the
lookahead windows ``a_1..a_{H-1}`` start as copies of ``a_0`` and are free variables that only
shape the objective. H = 1 is the official MetaWorld setting (the paper's Table 7 ablates 1, 3, 5);
there the solver gets the objective's Jacobian in closed form (``residual_jacobian``).

Initialisation: ``init="base"`` (the stored/live base window), ``"zero"`` (action 0 in env units)
or ``"random"`` (N(0, 1) in normalised units): the paper's Tables 4-5 ablation.

Test time: ``samples`` latents from the prior N(0, I); each is optimised, and the window whose
solution has the lowest objective value (best f) is returned (``samples=1``: the single solve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from difftori.base_policies.base import Generators, Obs, ShapeMeta, randn
from difftori.base_policies.encoders import mlp
from difftori.datasets.episode_store import ACTION_KEY
from difftori.refiners.base import REFINERS, Refiner, RefinerConfig
from difftori.refiners.trajopt import TrajOptConfig, mlp_jacobian, solve
from torch import nn
from torch.nn import functional as F

INITS = ("base", "zero", "random")


@dataclass(frozen=True)
class DiffTORIConfig(RefinerConfig):
    latent_dim: int = 64  # posterior Gaussian (paper App. D / Table 9)
    state_dim: int = 64  # latent state z_l of the dynamics
    hidden: tuple[int, ...] = (256, 256)
    objective_dim: int = 16  # entries of the residual vector g
    planning_horizon: int = 1
    gamma: float = 0.99
    proximity_weight: float = 0.1  # keeps early, untrained objectives from jumping far (measured: 0 diverged)
    beta: float = 0.1  # KL weight (measured: separates the two modes of the bimodal test)
    init: str = "base"
    samples: int = 1  # prior samples at test time
    trajopt: TrajOptConfig = field(default_factory=TrajOptConfig)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.planning_horizon < 1 or self.samples < 1:
            raise ValueError("planning_horizon and samples must be >= 1")


@REFINERS.register
class DiffTORIRefiner(Refiner):
    name = "difftori"
    label = "DiffTORI"

    def method_label(self, base_label: str) -> str:
        init = "" if self.config.init == "base" else f" ({self.config.init} init)"
        return f"DiffTORI{init} + {base_label}"

    config_cls = DiffTORIConfig

    def __init__(self, config: DiffTORIConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        c, feat = config, self.obs_encoder.out_dim
        self.action_encoder = mlp([self.chunk_dim, *c.hidden, c.latent_dim])
        self.posterior = mlp([feat + c.latent_dim, *c.hidden, 2 * c.latent_dim], last_act=False)
        self.state_proj = nn.Sequential(nn.Linear(feat, c.state_dim), nn.LayerNorm(c.state_dim))
        joint = c.latent_dim + c.state_dim + self.chunk_dim
        # ELU, as in the official code's reward network
        self.objective = mlp([joint, *c.hidden, c.objective_dim], last_act=False, act=nn.ELU)
        self.dynamics = (
            mlp([joint, *c.hidden, c.state_dim], last_act=False, act=nn.ELU)
            if c.planning_horizon > 1
            else None
        )
        self.cholesky_failures = 0  # counted over the module's life; logged during training

    # -- the optimisation problem ---------------------------------------------------------------
    def residual(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Residual vector (B, M) of the planning actions ``x`` (B, H*D) given ``ctx`` = [z~, z_0, x_init]."""
        c, d = self.config, self.chunk_dim
        z_lat, z = ctx[:, : c.latent_dim], ctx[:, c.latent_dim : c.latent_dim + c.state_dim]
        out = []
        for step in range(c.planning_horizon):
            a = x[:, step * d : (step + 1) * d]
            inp = torch.cat([z_lat, z, a], dim=-1)
            out.append(math.sqrt(c.gamma**step) * self.objective(inp))
            if step + 1 < c.planning_horizon:
                z = z + self.dynamics(inp)
        if c.proximity_weight > 0:
            out.append(self._proximity(x, ctx))
        return torch.cat(out, dim=-1)

    def _proximity(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """sqrt(proximity_weight) (x - x_init): the residual rows keeping x near its start."""
        c = self.config
        return math.sqrt(c.proximity_weight) * (x - ctx[:, c.latent_dim + c.state_dim :])

    def residual_jacobian(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual`` and its Jacobian (B, M, D) in closed form, for H = 1 (no dynamics to chain)."""
        c, d = self.config, self.chunk_dim
        inp = torch.cat([ctx[:, : c.latent_dim + c.state_dim], x], dim=-1)
        g, J = mlp_jacobian(self.objective, inp, slice(c.latent_dim + c.state_dim, None))
        if c.proximity_weight > 0:
            g = torch.cat([g, self._proximity(x, ctx)], dim=-1)
            eye = math.sqrt(c.proximity_weight) * torch.eye(d, dtype=x.dtype, device=x.device)
            eye = eye.expand(x.shape[0], d, d)
            J = torch.cat([J, eye], dim=1)
        return g, J

    def decode(
        self, z_lat: torch.Tensor, z_s: torch.Tensor, init_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimise from ``init_flat`` (B, D) normalised; returns (a_0 (B, D), final cost (B,))."""
        h = self.config.planning_horizon
        x0 = init_flat.repeat(1, h)
        ctx = torch.cat([z_lat, self.state_proj(z_s), x0], dim=-1)
        closed_form = self.residual_jacobian if h == 1 else None
        result = solve(self.residual, x0, ctx, self.config.trajopt, jacobian_fn=closed_form)
        self.cholesky_failures += result.cholesky_failures
        self.last_iterations = result.iterations
        with torch.no_grad():
            cost = (self.residual(result.x, ctx) ** 2).sum(-1)
        return result.x[:, : self.chunk_dim], cost

    def initial(self, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """The starting window (B, D), normalised, per ``config.init``."""
        if self.config.init == "base":
            return self.to_flat(init_action)
        if self.config.init == "zero":
            return self.to_flat(torch.zeros_like(init_action))
        return randn(init_action.shape[0], self.chunk_dim, generator=generator, device=init_action.device)

    # -- the contract ---------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        z_s = self.encode_obs(batch["obs"])
        expert = self.to_flat(batch[ACTION_KEY])
        mu, logvar = self.posterior(torch.cat([z_s, self.action_encoder(expert)], -1)).chunk(2, dim=-1)
        z_lat = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        refined, _ = self.decode(z_lat, z_s, self.initial(self.pick_init(batch)))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1).mean()
        return F.mse_loss(refined, expert) + self.config.beta * kl

    def refine(self, obs: Obs, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        s, b = self.config.samples, init_action.shape[0]
        z_s = self.encode_obs(obs).repeat_interleave(s, 0)
        init = self.initial(init_action, generator).repeat_interleave(s, 0)
        z_lat = randn(b, s, self.config.latent_dim, generator=generator, device=z_s.device).flatten(0, 1)
        with torch.no_grad():
            refined, cost = self.decode(z_lat, z_s, init)
        best = cost.view(-1, s).argmin(dim=1)
        refined = refined.detach().view(-1, s, self.chunk_dim)[torch.arange(best.shape[0]), best]
        return self.from_flat(refined)
