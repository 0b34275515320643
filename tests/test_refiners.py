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
    refiner = train(make("difftori", data, init=init), data, steps=3)
    refiner.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["init"] == init
    loaded = REFINERS.load(tmp_path / "r")
    assert loaded.config.init == init
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = loaded.refine(data["obs"], data["init_action"][:, 0], gen())
    b = refiner.refine(data["obs"], data["init_action"][:, 0], gen())
    torch.testing.assert_close(a, b)
    # the base action is ignored: the same output from a different base action
    c = loaded.refine(data["obs"], data["init_action"][:, 0] + 0.5, gen())
    torch.testing.assert_close(a, c)


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
