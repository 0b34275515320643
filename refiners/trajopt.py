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

Backward modes: ``unroll`` (autograd through every iteration), ``truncated`` (up to
``max_iterations - backward_iterations`` no-grad iterations, which may stop at convergence, then
exactly ``backward_iterations`` differentiated LM iterations with the fixed ``damping``, never
rejected and never stopped early, in both backends: a converged solve still gets the truncated
implicit gradient instead of Theseus's zero), ``implicit`` (no-grad iterations, then one
Gauss-Newton step with step size 1 whose Hessian is detached: its gradient is the
implicit-function gradient of a converged solution). ``iterations`` counts LM iterations run,
differentiated ones included, the same way in both backends.

Bounded steps (``max_step_norm > 0``, torch backend): every step (LM, the truncated mode's
fixed-damping ones, the implicit mode's final Gauss-Newton step) is scaled down to at most that
norm per sample, and the gain ratio uses the quadratic model of the scaled step. This is a trust
region: it limits how far one solve can move, not where the optimum is.

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
    max_step_norm: float = 0.0  # > 0: bounded LM steps (a trust region; torch backend only)

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "theseus"):
            raise ValueError(f"backend must be 'torch' or 'theseus', got {self.backend!r}")
        if self.backward_mode not in BACKWARD_MODES:
            raise ValueError(f"backward_mode must be one of {BACKWARD_MODES}, got {self.backward_mode!r}")
        if self.max_iterations < 1 or self.step_size <= 0 or self.damping <= 0 or self.max_step_norm < 0:
            raise ValueError("need max_iterations >= 1, step_size > 0, damping > 0, max_step_norm >= 0")
        if self.max_step_norm > 0 and self.backend != "torch":
            raise ValueError(
                "max_step_norm (bounded steps) needs backend 'torch'; Theseus's LM has no trust region"
            )

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


def _bounded(step: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``step`` scaled down per sample to norm <= ``max_norm`` (0: unchanged)."""
    if max_norm <= 0:
        return step
    norm = step.norm(dim=1, keepdim=True)
    return step * torch.clamp(max_norm / norm.clamp_min(1e-30), max=1.0)


def _predicted_decrease(
    step: torch.Tensor, damping: torch.Tensor, AtA: torch.Tensor, Atb: torch.Tensor, bounded: bool
) -> torch.Tensor:
    """The gain ratio's denominator: Theseus's ``step.(damping step + Atb) / 2`` for LM steps, the
    quadratic model's decrease ``step.Atb - step.AtA.step / 2`` for bounded (scaled) steps."""
    if not bounded:
        return (step * (damping.view(-1, 1) * step + Atb)).sum(dim=1) / 2
    return (step * Atb).sum(1) - (step.unsqueeze(1) @ AtA @ step.unsqueeze(-1)).view(-1) / 2


def _lm_loop(
    residual_fn: ResidualFn,
    jacobian_fn: JacobianFn,
    x: torch.Tensor,
    ctx: torch.Tensor,
    cfg: TrajOptConfig,
    damping: torch.Tensor,
    num_iter: int,
    phase: str = "solve",
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Theseus's ``_optimize_loop`` for LM; returns (x, damping, iterations done, Cholesky failures).

    ``phase``: ``solve`` (adaptive damping, bounded steps, stops at convergence), ``fixed``
    (truncated backward: fixed damping, every step taken, no early stop) or ``gauss_newton``
    (implicit backward: one GN step, detached Hessian, step size 1)."""
    adaptive = cfg.adaptive_damping and phase == "solve"
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        last_err = _error(residual_fn(x, ctx))
    it = failures = rejected_rounds = 0
    while it < num_iter:
        r, J = jacobian_fn(x, ctx)
        Jt = J.transpose(1, 2)
        AtA = Jt @ J
        Atb = -(Jt @ r.unsqueeze(-1)).squeeze(-1)
        if phase == "gauss_newton":
            step, f = _cholesky_solve(AtA.detach(), Atb, None)
            step = _bounded(step, cfg.max_step_norm)
        else:
            lam = damping if adaptive else torch.full_like(damping, cfg.damping)
            delta, f = _cholesky_solve(AtA, Atb, lam)
            step = _bounded(delta * cfg.step_size, cfg.max_step_norm)
        failures += f
        x_new = torch.where(converged.unsqueeze(-1), x, x + step)
        with torch.no_grad():
            err = _error(residual_fn(x_new, ctx))
        if adaptive:
            with torch.no_grad():
                den = _predicted_decrease(step, damping, AtA, Atb, cfg.max_step_norm > 0)
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
        it += 1
        if phase == "solve":
            with torch.no_grad():
                converged = _converged(err, last_err, cfg)
            if converged.all():
                break
        last_err = err
    return x, damping, it, failures


def _converged(err: torch.Tensor, last_err: torch.Tensor, cfg: TrajOptConfig) -> torch.Tensor:
    """Theseus's per-sample test: mean error below the absolute tolerance (all), or a small change.
    The relative tolerance is at least 10 machine epsilons: in float32 Theseus's 1e-8 is below the
    rounding noise of the error, so convergence (and a batch's result) would depend on rounding."""
    if err.abs().mean() < cfg.abs_err_tolerance:
        return torch.ones_like(err, dtype=torch.bool)
    change = err - last_err
    rel_tol = max(cfg.rel_err_tolerance, 10 * torch.finfo(err.dtype).eps)  # below: rounding noise
    return (change.abs() < cfg.abs_err_tolerance) | ((change / last_err).abs() < rel_tol)


def _solve_torch(
    residual_fn: ResidualFn, jacobian_fn: JacobianFn, x0: torch.Tensor, ctx: torch.Tensor, cfg: TrajOptConfig
) -> TrajOptResult:
    damping = torch.full((x0.shape[0],), cfg.damping, dtype=x0.dtype, device=x0.device)
    if cfg.backward_mode == "unroll":
        x, _, iters, failures = _lm_loop(residual_fn, jacobian_fn, x0, ctx, cfg, damping, cfg.max_iterations)
        return TrajOptResult(x, iters, failures)
    k = cfg.grad_iterations
    with torch.no_grad():
        x, damping, iters, failures = _lm_loop(
            residual_fn, jacobian_fn, x0.detach(), ctx, cfg, damping, cfg.max_iterations - k
        )
    phase = "gauss_newton" if cfg.backward_mode == "implicit" else "fixed"
    x, _, more, f = _lm_loop(residual_fn, jacobian_fn, x, ctx, cfg, damping, k, phase)
    return TrajOptResult(x, iters + more, failures + f)


# -- the Theseus backend -------------------------------------------------------------------------
def _solve_theseus(
    residual_fn: ResidualFn, x0: torch.Tensor, ctx: torch.Tensor, cfg: TrajOptConfig
) -> TrajOptResult:
    """Theseus's LM; truncated mode as two Theseus solves (no-grad, then the fixed-damping unroll)."""
    if cfg.backward_mode != "truncated":
        return _theseus_phase(residual_fn, x0, ctx, cfg, cfg.max_iterations, {})
    k = cfg.grad_iterations
    first = TrajOptResult(x0.detach(), 0, 0)
    if cfg.max_iterations > k:
        with torch.no_grad():
            plain = {"backward_mode": "unroll"}  # one plain loop (no graph is recorded here)
            first = _theseus_phase(residual_fn, x0.detach(), ctx, cfg, cfg.max_iterations - k, plain)
    fixed = {"backward_mode": "unroll", "adaptive_damping": False, "tolerance": 0.0}
    second = _theseus_phase(residual_fn, first.x.detach(), ctx, cfg, k, fixed)
    return TrajOptResult(second.x, first.iterations + k, first.cholesky_failures + second.cholesky_failures)


def _theseus_phase(
    residual_fn: ResidualFn,
    x0: torch.Tensor,
    ctx: torch.Tensor,
    cfg: TrajOptConfig,
    iterations: int,
    over: dict,
) -> TrajOptResult:
    """One Theseus LM solve of up to ``iterations``; ``over`` overrides backward mode, adaptive
    damping and tolerances (``tolerance: 0`` never stops early). Cholesky failures raise the damping."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warnings inside theseus
        import theseus as th

        with torch.no_grad():
            dim = residual_fn(x0[:1], ctx[:1]).shape[1]
        tol = over.get("tolerance")
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
                max_iterations=iterations,
                step_size=cfg.step_size,
                abs_err_tolerance=cfg.abs_err_tolerance if tol is None else tol,
                rel_err_tolerance=cfg.rel_err_tolerance if tol is None else tol,
            )
            kwargs = dict(
                damping=damping,
                adaptive_damping=over.get("adaptive_damping", cfg.adaptive_damping),
                backward_mode=over.get("backward_mode", cfg.backward_mode),
                backward_num_iterations=cfg.grad_iterations,
                verbose=False,
            )
            try:
                sol, info = th.TheseusLayer(optimizer).forward({"x": x0, "ctx": ctx}, optimizer_kwargs=kwargs)
            except RuntimeError as e:  # "linalg.cholesky ... not positive-definite"
                if "cholesky" not in str(e).lower() and "linear" not in str(e).lower():
                    raise
                failures, damping = failures + x0.shape[0], damping * 10
                continue
            if (info.status == th.NonlinearOptimizerStatus.FAIL).any():
                failures, damping = failures + x0.shape[0], damping * 10
                continue
            mode = kwargs["backward_mode"]
            return TrajOptResult(sol["x"], _theseus_iterations(info, iterations, mode), failures)
    return TrajOptResult(x0, 0, failures)


def _theseus_iterations(info: object, iterations: int, backward_mode: str) -> int:
    """Iterations run, counted as the torch backend does: all of them unless every sample
    converged, and the implicit mode's final Gauss-Newton step included."""
    import theseus as th

    if (info.status != th.NonlinearOptimizerStatus.CONVERGED).any():
        return iterations
    return int(torch.as_tensor(info.converged_iter).max()) + (backward_mode == "implicit")
