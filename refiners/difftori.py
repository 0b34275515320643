"""DiffTORI (``difftori``): a CVAE whose decoder is differentiable trajectory optimisation.

Encoder (training only): state features ``z_s = h_o(obs)`` (the shared observation encoder),
action features ``z_a = h_a(a*)`` of the expert window, and a fusing MLP
``h_l(z_s, z_a) -> (mu, log sigma^2)`` of a Gaussian posterior over ``z~`` (dim ``latent_dim``).

Decoder: starting from ``a_start`` (``init``), Levenberg-Marquardt minimises

    sum_{l<H} gamma^l ||g(z~, z_l, a_l)||^2  [+ proximity_weight ||a - a_base||^2 if anchor="base"]
    z_0 = proj(z_s),   z_{l+1} = z_l + d(z~, z_l, a_l)

over the planning actions a_0..a_{H-1}: the paper's ``max sum gamma^l f`` with ``f = -||g||^2`` for a
learned residual vector ``g`` (``objective_dim`` entries, by default 3x the window so ``g = 0`` is
over-determined), written as least squares (residual ``[sqrt(gamma^l) g_l]_l`` + the anchor rows) so
Gauss-Newton is well posed, with no constant offset. Loss: ``MSE(a_0(theta), a*) + beta * KL``.

Deviations from the paper, each a config field: the paper's ``f`` is a scalar (the official code
ascends ``1000 - mean R`` with step 3e-5); the anchor (``anchor``, ``proximity_weight``) is ours
(``anchor="none"`` drops it); ``trajopt.max_step_norm`` bounds each LM step (a trust region that
leaves the argmin unchanged). Method labels name every setting that differs from the paper's.

Chunk <-> horizon: one planning action ``a_l`` is one whole action window of the base policy
(H_window x Da, normalised, flattened). ``a_0`` is the window being refined; for H > 1 the
lookahead windows ``a_1..a_{H-1}`` start as copies of ``a_0`` and are free variables that only
shape the objective. H = 1 is the official code's setting (the paper's Table 7 ablates 1, 3, 5);
there the solver gets the objective's Jacobian in closed form (``residual_jacobian``).

Where LM starts (``init``, the paper's Tables 4-5 ablation) is separate from the anchor:
``"base"`` (the base window), ``"zero"`` (action 0 in env units) or ``"random"`` (N(0, 1) in
normalised units); the anchor is always the base window.

Test time: ``samples`` latents from the prior N(0, I); each is optimised, and the window whose
solution has the lowest learned objective (the anchor rows excluded) is returned.
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
ANCHORS = ("base", "none")


@dataclass(frozen=True)
class DiffTORIConfig(RefinerConfig):
    latent_dim: int = 64  # posterior Gaussian (paper App. D / Table 9)
    state_dim: int = 64  # latent state z_l of the dynamics
    hidden: tuple[int, ...] = (256, 256)
    # entries of the residual vector g; 0: 3 x the window (H_window x Da), so that g(a) = 0 is
    # over-determined (equal sizes make it a square root-finding problem an untrained g solves far away)
    objective_dim: int = 0
    planning_horizon: int = 1
    gamma: float = 0.99
    # What the solution is pulled toward: "base" adds sqrt(proximity_weight) (a - a_base) rows (the
    # base window, whatever the start); "none" solves the learned objective alone (the paper's).
    anchor: str = "base"
    proximity_weight: float = 0.1  # the anchor's weight (anchor "base" only; 0 with anchor "none")
    beta: float = 0.1  # KL weight (measured: separates the two modes of the bimodal test)
    init: str = "base"  # where LM starts (Tables 4-5 ablation): base, zero, random
    samples: int = 1  # prior samples at test time; the lowest learned objective (anchor excluded) wins
    trajopt: TrajOptConfig = field(default_factory=TrajOptConfig)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if (self.anchor == "base") != (self.proximity_weight > 0):
            raise ValueError(
                f"anchor {self.anchor!r} with proximity_weight {self.proximity_weight}: anchor 'base' "
                "needs proximity_weight > 0, anchor 'none' needs proximity_weight 0"
            )
        if self.planning_horizon < 1 or self.samples < 1 or self.objective_dim < 0:
            raise ValueError("planning_horizon and samples must be >= 1, objective_dim >= 0")

    def variant_tags(self) -> list[str]:
        """What differs from the paper's DiffTORI, for method labels (e.g. ``zero init``, ``H=3``)."""
        tags = [f"{self.init} init"] if self.init != "base" else []
        tags += [f"anchor {self.proximity_weight:g}"] if self.anchor == "base" else []
        tags += [f"H={self.planning_horizon}"] if self.planning_horizon != 1 else []
        tags += [f"objective_dim {self.objective_dim}"] if self.objective_dim else []
        tags += [f"steps<={self.trajopt.max_step_norm:g}"] if self.trajopt.max_step_norm > 0 else []
        tags += [f"{self.samples} samples"] if self.samples != 1 else []
        return tags


@REFINERS.register
class DiffTORIRefiner(Refiner):
    name = "difftori"
    label = "DiffTORI"

    def method_label(self, base_label: str) -> str:
        tags = ", ".join(self.config.variant_tags())
        return f"DiffTORI ({tags}) + {base_label}" if tags else f"DiffTORI + {base_label}"

    config_cls = DiffTORIConfig

    @property
    def uses_base(self) -> bool:
        return self.config.init == "base" or self.config.anchor == "base"

    def __init__(self, config: DiffTORIConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        c, feat = config, self.obs_encoder.out_dim
        self.objective_dim = c.objective_dim or 3 * self.chunk_dim
        self.action_encoder = mlp([self.chunk_dim, *c.hidden, c.latent_dim])
        self.posterior = mlp([feat + c.latent_dim, *c.hidden, 2 * c.latent_dim], last_act=False)
        self.state_proj = nn.Sequential(nn.Linear(feat, c.state_dim), nn.LayerNorm(c.state_dim))
        joint = c.latent_dim + c.state_dim + self.chunk_dim
        # ELU, as in the official code's reward network
        self.objective = mlp([joint, *c.hidden, self.objective_dim], last_act=False, act=nn.ELU)
        self.dynamics = (
            mlp([joint, *c.hidden, c.state_dim], last_act=False, act=nn.ELU)
            if c.planning_horizon > 1
            else None
        )
        self.cholesky_failures = 0  # counted over the module's life; logged during training

    # -- the optimisation problem ---------------------------------------------------------------
    def residual(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Residual vector (B, M) of the planning actions ``x`` (B, H*D) given ``ctx`` =
        [z~, z_0, a_base repeated H times]: ``[sqrt(gamma^l) g_l]_l``, then the anchor rows if any."""
        c, d = self.config, self.chunk_dim
        z_lat, z = ctx[:, : c.latent_dim], ctx[:, c.latent_dim : c.latent_dim + c.state_dim]
        out = []
        for step in range(c.planning_horizon):
            a = x[:, step * d : (step + 1) * d]
            inp = torch.cat([z_lat, z, a], dim=-1)
            out.append(math.sqrt(c.gamma**step) * self.objective(inp))
            if step + 1 < c.planning_horizon:
                z = z + self.dynamics(inp)
        if c.anchor == "base":
            out.append(self._proximity(x, ctx))
        return torch.cat(out, dim=-1)

    def _proximity(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """sqrt(proximity_weight) (x - a_base): the anchor rows keeping x near the base window."""
        c = self.config
        return math.sqrt(c.proximity_weight) * (x - ctx[:, c.latent_dim + c.state_dim :])

    def residual_jacobian(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual`` and its Jacobian (B, M, D) in closed form, for H = 1 (no dynamics to chain)."""
        c, d = self.config, self.chunk_dim
        inp = torch.cat([ctx[:, : c.latent_dim + c.state_dim], x], dim=-1)
        g, J = mlp_jacobian(self.objective, inp, slice(c.latent_dim + c.state_dim, None))
        if c.anchor == "base":
            g = torch.cat([g, self._proximity(x, ctx)], dim=-1)
            eye = math.sqrt(c.proximity_weight) * torch.eye(d, dtype=x.dtype, device=x.device)
            eye = eye.expand(x.shape[0], d, d)
            J = torch.cat([J, eye], dim=1)
        return g, J

    def context(self, z_lat: torch.Tensor, z_s: torch.Tensor, base_flat: torch.Tensor) -> torch.Tensor:
        """The solver's fixed inputs ``[z~, z_0, a_base x H]`` (B, latent + state + H*D)."""
        return torch.cat([z_lat, self.state_proj(z_s), base_flat.repeat(1, self.config.planning_horizon)], -1)

    def objective_value(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The learned objective's cost ``sum_l gamma^l ||g_l||^2`` (B,), the anchor excluded."""
        rows = self.config.planning_horizon * self.objective_dim
        return (self.residual(x, ctx)[:, :rows] ** 2).sum(-1)

    def decode(
        self, z_lat: torch.Tensor, z_s: torch.Tensor, start: torch.Tensor, base_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimise from ``start`` (B, D), anchored (if ``anchor="base"``) to ``base_flat`` (B, D),
        both normalised; returns (a_0 (B, D), the learned objective's final cost (B,))."""
        ctx = self.context(z_lat, z_s, base_flat)
        closed_form = self.residual_jacobian if self.config.planning_horizon == 1 else None
        x0 = start.repeat(1, self.config.planning_horizon)
        result = solve(self.residual, x0, ctx, self.config.trajopt, jacobian_fn=closed_form)
        self.cholesky_failures += result.cholesky_failures
        self.last_iterations = result.iterations
        with torch.no_grad():
            cost = self.objective_value(result.x, ctx)
        return result.x[:, : self.chunk_dim], cost

    def initial(self, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """The starting window (B, D), normalised, per ``config.init``."""
        if self.config.init == "base":
            return self.to_flat(init_action)
        if self.config.init == "zero":
            return self.to_flat(torch.zeros_like(init_action))
        return randn(init_action.shape[0], self.chunk_dim, generator=generator, device=init_action.device)

    def draw(
        self, init_action: torch.Tensor, samples: int, generator: Generators = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``samples`` prior latents (B*S, latent) per item and the starts (B*S, D) they solve from,
        in ``refine``'s order: the latents first, so every ``init`` draws the same latents."""
        b = init_action.shape[0]
        z_lat = randn(b, samples, self.config.latent_dim, generator=generator, device=init_action.device)
        start = self.initial(init_action, generator).repeat_interleave(samples, 0)
        return z_lat.flatten(0, 1), start

    # -- the contract ---------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        z_s = self.encode_obs(batch["obs"])
        expert = self.to_flat(batch[ACTION_KEY])
        mu, logvar = self.posterior(torch.cat([z_s, self.action_encoder(expert)], -1)).chunk(2, dim=-1)
        z_lat = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        base = self.pick_init(batch)
        refined, _ = self.decode(z_lat, z_s, self.initial(base), self.to_flat(base))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1).mean()
        return F.mse_loss(refined, expert) + self.config.beta * kl

    def refine(self, obs: Obs, init_action: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        s = self.config.samples
        z_s = self.encode_obs(obs).repeat_interleave(s, 0)
        z_lat, start = self.draw(init_action, s, generator)
        base = self.to_flat(init_action).repeat_interleave(s, 0)
        with torch.no_grad():
            refined, cost = self.decode(z_lat, z_s, start, base)
        best = cost.view(-1, s).argmin(dim=1)
        refined = refined.detach().view(-1, s, self.chunk_dim)[torch.arange(best.shape[0]), best]
        return self.from_flat(refined)
