"""The differentiable trajectory-optimisation layer: gradients, backends, failures."""

import pytest
import torch
from difftori.refiners.trajopt import BACKWARD_MODES, TrajOptConfig, jacobian, mlp_jacobian, solve

torch.set_num_threads(1)


class Tiny(torch.nn.Module):
    """r(x) = (2I + 0.3 W) x + 0.3 tanh(x) + b - ctx: strictly monotone, zero residual at the optimum."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        A = 2 * torch.eye(3, dtype=x.dtype) + 0.3 * self.W
        return x @ A.T + 0.3 * torch.tanh(x) + self.b - ctx


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_parameter_gradients_match_finite_differences(mode):
    f = Tiny()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ctx = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64)
    cfg = TrajOptConfig(max_iterations=30, damping=1e-2, backward_mode=mode, backward_iterations=3)

    def loss() -> torch.Tensor:
        return (solve(f, x0, ctx, cfg).x * v).sum()

    loss().backward()
    analytic = [f.W.grad.clone(), f.b.grad.clone(), ctx.grad.clone()]
    numeric = []
    eps = 1e-6
    for p in (f.W, f.b, ctx):
        grad = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + eps
                up = loss()
                flat[i] = old - eps
                down = loss()
                flat[i] = old
            grad.view(-1)[i] = (up - down) / (2 * eps)
        numeric.append(grad)
    for a, n in zip(analytic, numeric, strict=True):
        assert torch.allclose(a, n, rtol=1e-5, atol=1e-7), (mode, a, n)


def test_solution_is_the_optimum():
    f = Tiny()
    x0 = torch.zeros(5, 3, dtype=torch.float64)
    ctx = torch.randn(5, 3, dtype=torch.float64)
    out = solve(f, x0, ctx, TrajOptConfig(max_iterations=30, damping=1e-2))
    assert f(out.x, ctx).abs().max() < 1e-8
    assert out.iterations < 30  # stopped by tolerance


def test_jacobian_matches_autograd():
    f = Tiny()
    x = torch.randn(3, 3, dtype=torch.float64)
    ctx = torch.randn(3, 3, dtype=torch.float64)
    r, J = jacobian(f, x, ctx)
    for b in range(3):
        ref = torch.autograd.functional.jacobian(lambda y, b=b: f(y[None], ctx[b : b + 1])[0], x[b])
        torch.testing.assert_close(J[b], ref)
    torch.testing.assert_close(r, f(x, ctx))


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_torch_fast_path_matches_theseus(mode):
    """Same solutions and parameter gradients (relative error < 1e-4) on a DiffTORI-like problem."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4 + 3, 32), torch.nn.ELU(), torch.nn.Linear(32, 6)).double()
    x0 = torch.randn(6, 4, dtype=torch.float64)
    ctx = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = {}
    for backend in ("torch", "theseus"):
        cfg = TrajOptConfig(
            backend=backend, max_iterations=8, damping=0.1, backward_mode=mode, backward_iterations=3
        )
        net.zero_grad()
        ctx.grad = None
        x = solve(lambda a, c: net(torch.cat([a, c], -1)), x0, ctx, cfg).x
        (x**2).sum().backward()
        out[backend] = [x.detach(), *[p.grad.clone() for p in net.parameters()], ctx.grad.clone()]
    for a, b in zip(out["torch"], out["theseus"], strict=True):
        assert (a - b).norm() / b.norm() < 1e-4


def test_cholesky_failure_is_handled_and_counted():
    """A rank-deficient problem (residual 1-D, 3 unknowns) without damping cannot be factorised:
    the layer raises the damping instead of crashing, and counts the failures."""

    def rank_one(x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return (x.sum(-1, keepdim=True) - ctx) * torch.ones(1, 2, dtype=x.dtype)

    x0 = torch.zeros(2, 3, dtype=torch.float64)
    ctx = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    out = solve(rank_one, x0, ctx, TrajOptConfig(max_iterations=5, backward_mode="implicit"))
    assert out.cholesky_failures > 0
    assert torch.isfinite(out.x).all()
    out.x.sum().backward()
    assert torch.isfinite(ctx.grad).all()


@pytest.mark.parametrize("act", [torch.nn.ELU, torch.nn.ReLU, torch.nn.Tanh])
def test_closed_form_mlp_jacobian_matches_forward_mode(act):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(7, 16), act(), torch.nn.Linear(16, 16), act(), torch.nn.Linear(16, 5)
    ).double()
    inp = torch.randn(4, 7, dtype=torch.float64)
    out, J = mlp_jacobian(net, inp, slice(3, None))
    r, ref = jacobian(lambda a, c: net(torch.cat([c, a], -1)), inp[:, 3:], inp[:, :3])
    torch.testing.assert_close(out, r)
    torch.testing.assert_close(J, ref)


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_closed_form_jacobian_gives_the_same_solution_and_gradients(mode):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4 + 3, 32), torch.nn.ELU(), torch.nn.Linear(32, 6)).double()
    x0 = torch.randn(6, 4, dtype=torch.float64)
    ctx = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    cfg = TrajOptConfig(max_iterations=8, damping=0.1, backward_mode=mode, backward_iterations=3)
    out = []
    for closed_form in (False, True):
        net.zero_grad()
        ctx.grad = None
        jac = (lambda a, c: mlp_jacobian(net, torch.cat([a, c], -1), slice(0, 4))) if closed_form else None
        x = solve(lambda a, c: net(torch.cat([a, c], -1)), x0, ctx, cfg, jacobian_fn=jac).x
        (x**2).sum().backward()
        out.append([x.detach(), *[p.grad.clone() for p in net.parameters()], ctx.grad.clone()])
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)


def test_truncated_backward_after_convergence_agrees_across_backends():
    """DiffTORI's shape (H = 1, 4 x 4 window, 48 objective rows, the anchor): the no-grad phase
    converges before the differentiated iterations. Both backends then still take exactly k
    fixed-damping steps, report the same iteration count, and give the same non-zero gradients
    (Theseus's own truncated mode returned exactly 0 for such a sample)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16 + 8, 64), torch.nn.ELU(), torch.nn.Linear(64, 48)).double()
    x0 = 0.1 * torch.randn(5, 16, dtype=torch.float64)
    ctx = torch.cat([torch.randn(5, 8, dtype=torch.float64), x0], -1).requires_grad_()  # [context, anchor]

    def residual(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(torch.cat([a, c[:, :8]], -1)), 0.3 * (a - c[:, 8:])], -1)

    cfg = dict(max_iterations=40, damping=0.1, backward_mode="truncated", backward_iterations=3)
    with torch.no_grad():  # the undifferentiated phase alone converges well before 37 iterations
        assert solve(residual, x0, ctx, TrajOptConfig(max_iterations=37)).iterations < 37
    out = {}
    for backend in ("torch", "theseus"):
        net.zero_grad()
        ctx.grad = None
        res = solve(residual, x0, ctx, TrajOptConfig(backend=backend, **cfg))
        (res.x**2).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()] + [ctx.grad.clone()]
        out[backend] = (res.iterations, res.x.detach(), grads)
    assert out["torch"][0] == out["theseus"][0] < 40  # converged iterations + the 3 differentiated
    torch.testing.assert_close(out["torch"][1], out["theseus"][1], rtol=1e-6, atol=1e-8)
    for a, b in zip(out["torch"][2], out["theseus"][2], strict=True):
        assert b.norm() > 1e-3 and (a - b).norm() / b.norm() < 1e-4


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_iteration_counts_agree(mode):
    """``iterations`` counts the iterations run until every sample converged (the implicit mode's
    Gauss-Newton step and the truncated mode's differentiated ones included), as both backends do."""
    f = Tiny()
    x0 = torch.zeros(5, 3, dtype=torch.float64)
    ctx = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for max_iterations in (30, 2):
        counts = [
            solve(
                f, x0, ctx, TrajOptConfig(backend=b, max_iterations=max_iterations, backward_mode=mode)
            ).iterations
            for b in ("torch", "theseus")
        ]
        converged = {"unroll": 3, "implicit": 3 + 1, "truncated": 3 + 5}[mode]  # 5: backward_iterations
        assert counts[0] == counts[1] == (converged if max_iterations == 30 else 2), counts


def test_bounded_steps_limit_each_step_not_the_optimum():
    """``max_step_norm`` caps how far each LM step moves a sample; with enough iterations the
    solve still reaches the same optimum as unbounded LM (a trust region, not a new objective)."""
    f = Tiny()
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    ctx = 5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    free = solve(f, x0, ctx, TrajOptConfig(max_iterations=50, damping=1e-3))
    for mode in BACKWARD_MODES:  # every kind of step is bounded: LM, fixed-damping, Gauss-Newton
        cfg = TrajOptConfig(max_iterations=3, damping=1e-3, max_step_norm=0.2, backward_mode=mode)
        assert (solve(f, x0, ctx, cfg).x - x0).norm(dim=1).max() <= 3 * 0.2 + 1e-12, mode
    one = solve(f, x0, ctx, TrajOptConfig(max_iterations=1, damping=1e-3, max_step_norm=0.2))
    assert (one.x - x0).norm(dim=1).max() <= 0.2 + 1e-12
    assert (free.x - x0).norm(dim=1).min() > 1.0  # the unbounded optimum is far away
    bounded = solve(f, x0, ctx, TrajOptConfig(max_iterations=200, damping=1e-3, max_step_norm=0.2))
    torch.testing.assert_close(bounded.x, free.x, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs backend 'torch'"):
        TrajOptConfig(backend="theseus", max_step_norm=0.2)
