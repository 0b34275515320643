"""Refiners on synthetic one-step problems, checkpoints, and the RefinedPolicy composite."""

import json

import pytest
import torch
from difftori.base_policies import make_policy
from difftori.refiners import REFINERS, RefinedPolicy
from refiner_helpers import SHAPE, SMALL, biased_data, bimodal_data, make, train

torch.set_num_threads(1)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("name", ["difftori", "residual", "ibc"])
def test_refiner_halves_a_known_bias(name):
    """The base is the expert plus a constant bias: each refiner at least halves held-out error."""
    train_data, test = biased_data(512, seed=0), biased_data(256, seed=1)
    refiner = train(make(name, train_data), train_data, steps=300)
    out = refiner.refine(test["obs"], test["init_action"][:, 0], torch.Generator().manual_seed(0)).detach()
    base_error = mse(test["init_action"][:, 0], test["action"])
    assert mse(out, test["action"]) < 0.5 * base_error


def test_difftori_reaches_both_modes_and_residual_cannot():
    """Two expert actions per state (+m, -m), a base at their mean: with different prior samples
    DiffTORI returns actions near both modes (the paper's Fig. 4); the residual refiner, being a
    function of (state, base action), returns one action per state, near neither mode.
    Measured: 42% / 44% of DiffTORI's outputs within 0.25 of +m / -m; 0% / 0% for residual."""
    data, test = bimodal_data(512, seed=0), bimodal_data(128, seed=1)
    m = torch.tensor([0.6, 0.6])

    def fractions(refiner):
        outs = torch.stack(
            [
                refiner.refine(test["obs"], test["init_action"][:, 0], torch.Generator().manual_seed(k))[:, 0]
                for k in range(8)
            ]
        ).detach()
        near = lambda c: float(((outs - c).norm(dim=-1) < 0.25).float().mean())  # noqa: E731
        return near(m), near(-m)

    plus, minus = fractions(train(make("difftori", data), data, steps=1200))
    assert plus > 0.25 and minus > 0.25, (plus, minus)
    plus, minus = fractions(train(make("residual", data), data, steps=600))
    assert plus < 0.05 and minus < 0.05, (plus, minus)


def test_difftori_closed_form_jacobian_matches_forward_mode():
    from difftori.refiners.trajopt import jacobian

    data = biased_data(8, seed=0)
    refiner = make("difftori", data).double()
    c = refiner.config
    x = torch.randn(8, refiner.chunk_dim, dtype=torch.float64)
    ctx = torch.randn(8, c.latent_dim + c.state_dim + refiner.chunk_dim, dtype=torch.float64)
    r, J = refiner.residual_jacobian(x, ctx)
    r_ref, J_ref = jacobian(refiner.residual, x, ctx)
    torch.testing.assert_close(r, r_ref)
    torch.testing.assert_close(J, J_ref)
    assert J.shape == (8, c.objective_dim + refiner.chunk_dim, refiner.chunk_dim)  # with proximity rows


@pytest.mark.parametrize("init", ["zero", "random"])
def test_difftori_init_options(init, tmp_path):
    data = biased_data(64, seed=0)
    refiner = train(make("difftori", data, init=init, anchor="none", proximity_weight=0.0), data, steps=3)
    refiner.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["init"] == init
    loaded = REFINERS.load(tmp_path / "r")
    assert loaded.config.init == init
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = loaded.refine(data["obs"], data["init_action"][:, 0], gen())
    b = refiner.refine(data["obs"], data["init_action"][:, 0], gen())
    torch.testing.assert_close(a, b)
    # without an anchor the base action is ignored: the same output from a different base action
    c = loaded.refine(data["obs"], data["init_action"][:, 0] + 0.5, gen())
    torch.testing.assert_close(a, c)


def _solver_inputs(refiner, data: dict, monkeypatch) -> dict:
    """The (x0, ctx) one refine() call hands the solver, and its residual rows at x0."""
    import difftori.refiners.difftori as module
    from difftori.refiners.trajopt import solve

    seen = {}

    def spy(residual_fn, x0, ctx, cfg, jacobian_fn=None):
        seen.update(x0=x0.clone(), ctx=ctx.clone(), rows=residual_fn(x0, ctx).detach())
        return solve(residual_fn, x0, ctx, cfg, jacobian_fn)

    monkeypatch.setattr(module, "solve", spy)
    refiner.refine(data["obs"], data["init_action"][:, 0], torch.Generator().manual_seed(1))
    return seen


@pytest.mark.parametrize("init", ["zero", "random"])
def test_init_variant_changes_only_where_the_solve_starts(init, monkeypatch):
    """The paper's Tables 4-5: the same network, only x0 differs; the anchor stays the base window."""
    data = biased_data(16, seed=0)
    base = make("difftori", data)
    variant = make("difftori", data, init=init)
    variant.load_state_dict(base.state_dict())
    a, b = _solver_inputs(base, data, monkeypatch), _solver_inputs(variant, data, monkeypatch)
    torch.testing.assert_close(a["ctx"], b["ctx"])  # same latent, state and anchor (the base window)
    torch.testing.assert_close(a["x0"], base.to_flat(data["init_action"][:, 0]))
    assert (a["x0"] - b["x0"]).abs().min() > 0
    if init == "zero":
        torch.testing.assert_close(b["x0"], base.to_flat(torch.zeros_like(data["init_action"][:, 0])))


def test_anchor_none_removes_only_the_anchor_rows(monkeypatch):
    data = biased_data(16, seed=0)
    base = make("difftori", data)
    free = make("difftori", data, anchor="none", proximity_weight=0.0)
    free.load_state_dict(base.state_dict())
    a, b = _solver_inputs(base, data, monkeypatch), _solver_inputs(free, data, monkeypatch)
    torch.testing.assert_close(a["x0"], b["x0"])
    rows = base.objective_dim
    assert a["rows"].shape[1] == rows + base.chunk_dim and b["rows"].shape[1] == rows
    torch.testing.assert_close(a["rows"][:, :rows], b["rows"])
    assert base.method_label("DP3") == "DiffTORI (anchor 0.1, objective_dim 8) + DP3"
    assert free.method_label("DP3") == "DiffTORI (objective_dim 8) + DP3"
    with pytest.raises(ValueError, match="anchor 'none' needs proximity_weight 0"):
        make("difftori", data, anchor="none")


def test_objective_dim_defaults_to_three_windows():
    data = biased_data(8, seed=0)
    refiner = make("difftori", data, objective_dim=0)
    assert refiner.objective_dim == 3 * refiner.chunk_dim
    assert refiner.objective[-1].out_features == 3 * refiner.chunk_dim


def test_samples_select_on_the_learned_objective_alone(monkeypatch):
    """With several prior samples the window with the lowest learned objective wins, whatever its
    anchor cost: the anchor rows are excluded from the selection."""
    data = biased_data(6, seed=0)
    refiner = make("difftori", data, samples=3)
    d = refiner.chunk_dim
    # candidates per item: far from the base with a low objective (k=1) vs at the base (k=0, 2)
    windows = torch.stack([torch.zeros(6, d), torch.full((6, d), 5.0), torch.ones(6, d)], 1).flatten(0, 1)
    costs = torch.tensor([1.0, 0.5, 2.0]).repeat(6)
    monkeypatch.setattr(refiner, "decode", lambda *a: (windows, costs))
    out = refiner.refine(data["obs"], data["init_action"][:, 0], torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, refiner.from_flat(torch.full((6, d), 5.0)))
    # decode's cost is the objective rows' sum of squares, not the anchor's
    refiner = make("difftori", data)
    z_lat, z_s = torch.randn(6, refiner.config.latent_dim), refiner.encode_obs(data["obs"])
    x, ctx = torch.randn(6, d), refiner.context(z_lat, z_s, torch.zeros(6, d))
    full = (refiner.residual(x, ctx) ** 2).sum(-1)
    objective = (refiner.residual(x, ctx)[:, : refiner.objective_dim] ** 2).sum(-1)
    torch.testing.assert_close(refiner.objective_value(x, ctx), objective)
    assert (full - objective).min() > 0


@pytest.mark.parametrize("name", ["difftori", "residual", "ibc"])
def test_refiner_checkpoint_round_trip(name, tmp_path):
    data = biased_data(64, seed=0)
    refiner = train(make(name, data), data, steps=3)
    refiner.save(tmp_path / name)
    loaded = REFINERS.load(tmp_path / name)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(
        loaded.refine(data["obs"], data["init_action"][:, 0], gen()),
        refiner.refine(data["obs"], data["init_action"][:, 0], gen()),
    )


def test_refined_policy_satisfies_the_policy_contract():
    base = make_policy(
        "pointnet_bc", {"horizon": 1, "n_obs_steps": 1, "n_action_steps": 1, "obs_keys": ["state"]}, SHAPE
    )
    refiner = make("residual", biased_data(16, seed=0))
    policy = RefinedPolicy(base, refiner)
    obs = {"state": torch.zeros(3, 1, 2)}
    assert policy.predict_action(obs).shape == (3, 1, 2)
    assert policy.obs_keys == ("state",)
    other = REFINERS.make("residual", SMALL["residual"] | {"horizon": 4}, SHAPE)
    with pytest.raises(ValueError, match="refiner windows"):
        RefinedPolicy(base, other)
