"""Differentiable trajectory optimisation: batched Levenberg-Marquardt on a residual vector.

Each sample ``b`` is its own nonlinear least-squares problem

    x_b* = argmin_x  1/2 || r(x, ctx_b) ||^2,      x in R^n (the flattened actions), r in R^M,

and the solution is differentiable with respect to ``ctx`` and every parameter ``r`` closes over.
Two backends compute the same iterates:

* ``theseus``: Theseus's ``LevenbergMarquardt`` with a dense Cholesky solver, one
  ``AutoDiffCostFunction`` whose batch dimension is the sample (per-sample Jacobians by vmap);
* ``torch``: the same algorithm written directly in torch (the fast path). Jacobians come from
  one batched forward-mode pass per input direction (``vmap`` over ``jvp``), which needs only
  that samples do not interact inside ``r``; the loop mirrors Theseus step for step: step size,
  adaptive damping (gain ratio rho; reject if rho <= 0.1, damping x11 on reject, /9 on accept,
  clamped to [1e-7, 1e7]), per-sample convergence masks (abs/rel error change), up to three
  all-rejected retries, and the backward modes below. A test checks both backends agree.

Backward modes: ``unroll`` (autograd through every iteration), ``truncated`` (no-grad
iterations, then autograd through the last ``backward_iterations``), ``implicit`` (no-grad
iterations, then one Gauss-Newton step with step size 1 whose Hessian is detached: its gradient
is the implicit-function gradient of a converged solution).

A Cholesky failure never crashes training: the damping of the failing samples is raised tenfold
and the solve retried; samples that still fail take no step. Failures are counted in the result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp, vmap

ResidualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,n), ctx (B,c)) -> (B,M)
# (x, ctx) -> (residual (B,M), Jacobian (B,M,n)); a closed form where the caller has one
JacobianFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

_MIN_DAMPING, _MAX_DAMPING = 1e-7, 1e7  # Theseus's LevenbergMarquardt bounds
_UP, _DOWN, _ACCEPT = 11.0, 9.0, 0.1  # Theseus's adaptive damping defaults
_MAX_ALL_REJECT = 3
_RETRIES = 4
BACKWARD_MODES = ("implicit", "truncated", "unroll")


@dataclass(frozen=True)
class TrajOptConfig:
    """Solver settings (params.yaml ``refiners.difftori.trajopt``)."""

    backend: str = "torch"  # "torch" (fast path) or "theseus"
    max_iterations: int = 10
    step_size: float = 1.0
    damping: float = 0.1
    adaptive_damping: bool = True
    backward_mode: str = "implicit"
    backward_iterations: int = 5  # truncated mode: iterations differentiated
    abs_err_tolerance: float = 1e-10  # Theseus's defaults
    rel_err_tolerance: float = 1e-8

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "theseus"):
            raise ValueError(f"backend must be 'torch' or 'theseus', got {self.backend!r}")
        if self.backward_mode not in BACKWARD_MODES:
            raise ValueError(f"backward_mode must be one of {BACKWARD_MODES}, got {self.backward_mode!r}")
        if self.max_iterations < 1 or self.step_size <= 0 or self.damping <= 0:
            raise ValueError("need max_iterations >= 1, step_size > 0, damping > 0")

    @property
    def grad_iterations(self) -> int:
        """Iterations run with autograd: all (unroll), the last k (truncated), one GN step (implicit)."""
        return {
            "unroll": self.max_iterations,
            "truncated": min(self.backward_iterations, self.max_iterations),
            "implicit": 1,
        }[self.backward_mode]


@dataclass
class TrajOptResult:
    x: torch.Tensor  # (B, n) the optimised variables
    iterations: int  # LM iterations actually run (early convergence stops sooner)
    cholesky_failures: int  # samples x solves that needed more damping or failed


def solve(
    residual_fn: ResidualFn,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    cfg: TrajOptConfig,
    jacobian_fn: JacobianFn | None = None,
) -> TrajOptResult:
    """Minimise ``1/2 ||residual_fn(x, ctx)||^2`` per sample from ``x0``; see the module docstring.

    ``jacobian_fn`` (torch backend only) replaces the forward-mode Jacobian with the caller's closed
    form; it must return the same residual and Jacobian (DiffTORI's H = 1 objective does).
    """
    if cfg.backend == "theseus":
        return _solve_theseus(residual_fn, x0, ctx, cfg)
    jac = jacobian_fn or (lambda x, c: jacobian(residual_fn, x, c))
    return _solve_torch(residual_fn, jac, x0, ctx, cfg)


# -- the torch fast path -------------------------------------------------------------------------
def _error(r: torch.Tensor) -> torch.Tensor:
    return (r**2).sum(dim=1) / 2


def jacobian(
    residual_fn: ResidualFn, x: torch.Tensor, ctx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (B, M) and its per-sample Jacobian (B, M, n) by one forward-mode pass per direction."""
    n = x.shape[1]
    basis = torch.eye(n, dtype=x.dtype, device=x.device)[:, None, :].expand(n, *x.shape)

    def column(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return jvp(lambda y: residual_fn(y, ctx), (x,), (v,))

    r, cols = vmap(column, out_dims=(None, 0))(basis)  # cols: (n, B, M)
    return r, cols.permute(1, 2, 0)


_ACT_GRADS: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # d act(pre) / d pre, from the layer, the pre-activation and the activation's output
    nn.ELU: lambda m, pre, out: torch.where(pre > 0, torch.ones_like(pre), out + m.alpha),
    nn.ReLU: lambda m, pre, out: (pre > 0).to(pre.dtype),
    nn.Tanh: lambda m, pre, out: 1 - out**2,
}


def mlp_jacobian(net: nn.Sequential, inp: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, out) of an MLP (``Linear`` and ELU/ReLU/Tanh layers) and its Jacobian (B, out, k)
    with respect to ``inp[:, cols]``, by the chain rule in closed form (differentiable, like autograd).
    """
    h, J = inp, None
    for layer in net:
        if isinstance(layer, nn.Linear):
            J = layer.weight[:, cols].expand(inp.shape[0], -1, -1) if J is None else layer.weight @ J
            h = layer(h)
        elif type(layer) in _ACT_GRADS:
            out = layer(h)
            J = _ACT_GRADS[type(layer)](layer, h, out).unsqueeze(-1) * J
            h = out
        else:
            raise TypeError(f"mlp_jacobian: unsupported layer {type(layer).__name__}")
    return h, J


def _cholesky_solve(
    A: torch.Tensor, b: torch.Tensor, damping: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Solve (A + damping I) x = b per sample; failing samples get 10x damping (then no step)."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    lam = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device) if damping is None else damping
    failures = 0
    ok = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    x = torch.zeros_like(b)
    for _ in range(_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(A + lam.view(-1, 1, 1) * eye)
        good = (info == 0) & ~ok
        if good.any():
            sol = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
            x = torch.where(good.unsqueeze(-1), sol, x)
            ok = ok | good
        if ok.all():
            break
        failures += int((~ok).sum())
        lam = torch.where(
            ok, lam, torch.clamp(lam * 10, min=1e-3 * A.diagonal(dim1=1, dim2=2).mean(1) + 1e-6)
        )
    return x, failures


def _lm_loop(
    residual_fn: ResidualFn,
    jacobian_fn: JacobianFn,
    x: torch.Tensor,
    ctx: torch.Tensor,
    cfg: TrajOptConfig,
    damping: torch.Tensor,
    num_iter: int,
    gauss_newton_step: bool,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Theseus's ``_optimize_loop`` for LM; returns (x, damping, iterations done, Cholesky failures)."""
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        last_err = _error(residual_fn(x, ctx))
    it = done = failures = rejected_rounds = 0
    while it < num_iter:
        r, J = jacobian_fn(x, ctx)
        Jt = J.transpose(1, 2)
        AtA = Jt @ J
        Atb = -(Jt @ r.unsqueeze(-1)).squeeze(-1)
        if gauss_newton_step:  # implicit differentiation: GN step, detached Hessian, step size 1
            delta, f = _cholesky_solve(AtA.detach(), Atb, None)
            step = delta
        else:
            delta, f = _cholesky_solve(
                AtA, Atb, damping if cfg.adaptive_damping else torch.full_like(damping, cfg.damping)
            )
            step = delta * cfg.step_size
        failures += f
        mask = converged.unsqueeze(-1) if not gauss_newton_step else torch.zeros_like(converged).unsqueeze(-1)
        x_new = torch.where(mask, x, x + step)
        with torch.no_grad():
            err = _error(residual_fn(x_new, ctx))
        if cfg.adaptive_damping and not gauss_newton_step:
            with torch.no_grad():
                den = (step * (damping.view(-1, 1) * step + Atb)).sum(dim=1) / 2
                reject = (last_err - err) / den <= _ACCEPT
                damping = torch.where(reject, damping * _UP, damping / _DOWN).clamp(
                    _MIN_DAMPING, _MAX_DAMPING
                )
            if reject.all():
                rejected_rounds += 1
                if rejected_rounds < _MAX_ALL_REJECT:
                    continue
                err = last_err  # every step rejected three times: nothing moves
            else:
                x = torch.where(reject.unsqueeze(-1), x, x_new)
                if reject.any():
                    with torch.no_grad():
                        err = _error(residual_fn(x, ctx))
        else:
            x = x_new
        rejected_rounds = 0
        with torch.no_grad():
            if err.abs().mean() < cfg.abs_err_tolerance:
                converged = torch.ones_like(converged)
            else:
                change = err - last_err
                converged = (change.abs() < cfg.abs_err_tolerance) | (
                    (change / last_err).abs() < cfg.rel_err_tolerance
                )
            if converged.all():
                break
            last_err = err
        done += 1
        it += 1
    return x, damping, done, failures


def _solve_torch(
    residual_fn: ResidualFn, jacobian_fn: JacobianFn, x0: torch.Tensor, ctx: torch.Tensor, cfg: TrajOptConfig
) -> TrajOptResult:
    damping = torch.full((x0.shape[0],), cfg.damping, dtype=x0.dtype, device=x0.device)
    k = cfg.grad_iterations
    iters = failures = 0
    x = x0
    if cfg.backward_mode != "unroll":
        with torch.no_grad():
            x, damping, iters, failures = _lm_loop(
                residual_fn, jacobian_fn, x0.detach(), ctx, cfg, damping, cfg.max_iterations - k, False
            )
    x, damping, more, f = _lm_loop(
        residual_fn, jacobian_fn, x, ctx, cfg, damping, k, gauss_newton_step=cfg.backward_mode == "implicit"
    )
    return TrajOptResult(x, iters + more, failures + f)


# -- the Theseus backend -------------------------------------------------------------------------
def _solve_theseus(
    residual_fn: ResidualFn, x0: torch.Tensor, ctx: torch.Tensor, cfg: TrajOptConfig
) -> TrajOptResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warnings inside theseus
        import theseus as th

        with torch.no_grad():
            dim = residual_fn(x0[:1], ctx[:1]).shape[1]
        damping, failures = cfg.damping, 0
        for _ in range(_RETRIES + 1):
            x = th.Vector(tensor=x0.clone(), name="x")
            c = th.Variable(ctx, name="ctx")

            def err_fn(optim_vars: tuple, aux_vars: tuple) -> torch.Tensor:
                return residual_fn(optim_vars[0].tensor, aux_vars[0].tensor)

            weight = th.ScaleCostWeight(torch.ones(1, dtype=x0.dtype, device=x0.device))
            cost = th.AutoDiffCostFunction([x], err_fn, dim, aux_vars=[c], cost_weight=weight, name="trajopt")
            objective = th.Objective(dtype=x0.dtype)
            objective.add(cost)
            optimizer = th.LevenbergMarquardt(
                objective,
                th.CholeskyDenseSolver,
                max_iterations=cfg.max_iterations,
                step_size=cfg.step_size,
                abs_err_tolerance=cfg.abs_err_tolerance,
                rel_err_tolerance=cfg.rel_err_tolerance,
            )
            kwargs = dict(
                damping=damping,
                adaptive_damping=cfg.adaptive_damping,
                backward_mode=cfg.backward_mode,
                backward_num_iterations=cfg.grad_iterations,
                verbose=False,
            )
            try:
                sol, info = th.TheseusLayer(optimizer).forward({"x": x0, "ctx": ctx}, optimizer_kwargs=kwargs)
            except RuntimeError as e:  # "linalg.cholesky ... not positive-definite"
                if "cholesky" not in str(e).lower() and "linear" not in str(e).lower():
                    raise
                failures += x0.shape[0]
                damping *= 10
                continue
            if (info.status == th.NonlinearOptimizerStatus.FAIL).any():
                failures += x0.shape[0]
                damping *= 10
                continue
            iters = int(torch.as_tensor(info.converged_iter).clamp_min(0).max()) or cfg.max_iterations
            return TrajOptResult(sol["x"], iters, failures)
    return TrajOptResult(x0, 0, failures)
