"""``inspect-refiner``: what it draws (grid = the learned objective, path = the solve) and its files."""

import copy
import json
import logging
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from difftori.base_policies.base import ShapeMeta
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.init_action_store import InitActionStore, InitMeta
from difftori.pipeline.cli import main
from difftori.pipeline.inspect_refiner import inspect_window, plot
from difftori.refiners import REFINERS
from difftori.refiners.trajopt import _lm_loop
from refiner_helpers import biased_data, make, train
from store_helpers import TINY, write_policy_store

torch.set_num_threads(1)
SAMPLES = 3


@pytest.fixture(scope="module")
def toy():
    """A DiffTORI refiner (3 prior samples) trained briefly on the biased one-step problem, and one
    held-out item (obs (1, 1, 2), base window (1, 2), expert window (1, 2))."""
    data = biased_data(256, seed=0)
    torch.manual_seed(0)  # the initial weights
    refiner = train(make("difftori", data, samples=SAMPLES), data, steps=60)
    test = biased_data(1, seed=1)
    return refiner, test["obs"], test["init_action"][0, 0], test["action"][0]


def variant(refiner, **config):
    """A copy of ``refiner`` with config fields replaced (same weights)."""
    other = copy.deepcopy(refiner)
    other.config = replace(other.config, **config)
    return other


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_grid_is_the_learned_objective_on_the_slice(toy):
    refiner, obs, base, expert = toy
    out = inspect_window(refiner, obs, base, expert, (0, 1), samples=SAMPLES, seed=4, grid=9)
    u, v = np.asarray(out["grid"]["u"]), np.asarray(out["grid"]["v"])
    base_flat = refiner.to_flat(base[None])
    assert out["base"] == pytest.approx(base_flat[0].tolist())
    assert u[0] <= out["base"][0] - 1.5 and u[-1] >= out["base"][0] + 1.5
    assert v[0] <= out["base"][1] - 1.5 and v[-1] >= out["base"][1] + 1.5
    # the latents are the prior draws of refine's generator
    drawn = torch.randn(1, SAMPLES, refiner.config.latent_dim, generator=torch.Generator().manual_seed(4))
    for s, rec in enumerate(out["samples"]):
        assert rec["latent"] == pytest.approx(drawn[0, s].tolist())
        ctx = refiner.context(torch.tensor([rec["latent"]]), refiner.encode_obs(obs), base_flat)
        for a, b in [(0, 0), (4, 4), (2, 7), (8, 1)]:
            x = torch.tensor([[u[b], v[a]]], dtype=torch.float32)
            expected = float(refiner.objective_value(x, ctx).detach())
            assert rec["objective"][a][b] == pytest.approx(expected, rel=1e-4, abs=1e-6)
            # the second row adds the anchor: proximity_weight * ||x - base||^2
            anchor = refiner.config.proximity_weight * float(((x - base_flat) ** 2).sum())
            assert rec["anchored"][a][b] == pytest.approx(expected + anchor, rel=1e-4, abs=1e-6)
        assert not np.allclose(rec["objective"], rec["objective"][0][0])  # not a flat image


@pytest.mark.parametrize("init", ["base", "random"])
def test_path_runs_from_the_start_to_decodes_solution(toy, init):
    refiner = variant(toy[0], init=init)
    _, obs, base, expert = toy
    out = inspect_window(refiner, obs, base, expert, (0, 1), samples=SAMPLES, seed=2)
    gen = torch.Generator().manual_seed(2)
    z_lat = torch.randn(SAMPLES, refiner.config.latent_dim, generator=gen)  # refine: latents first
    start = refiner.initial(base[None], gen).repeat(SAMPLES, 1)
    z_s = refiner.encode_obs(obs).repeat(SAMPLES, 1)
    base_flat = refiner.to_flat(base[None]).repeat(SAMPLES, 1)
    with torch.no_grad():
        solution, cost = refiner.decode(z_lat, z_s, start, base_flat)
        # the point before the last: the full solve's own no-grad LM iterations (implicit backward mode)
        cfg, ctx = refiner.config.trajopt, refiner.context(z_lat, z_s, base_flat)
        damping = torch.full((SAMPLES,), cfg.damping)
        args = (refiner.residual, refiner.residual_jacobian, start, ctx, cfg, damping)
        before_last = _lm_loop(*args, cfg.max_iterations - 1)[0]
    for s, rec in enumerate(out["samples"]):
        assert rec["start"] == pytest.approx(start[s].tolist(), abs=1e-6)
        assert rec["path"][0] == rec["start"] and rec["path"][-1] == rec["solution"]
        assert rec["solution_window"] == pytest.approx(solution[s].tolist(), abs=1e-5)
        assert rec["path"][-2] == pytest.approx(before_last[s].tolist(), abs=1e-5)
        assert rec["final_objective"] == pytest.approx(float(cost[s]), rel=1e-4, abs=1e-6)
        assert len(rec["path"]) == refiner.config.trajopt.max_iterations + 1
        assert np.linalg.norm(np.subtract(rec["path"][1], rec["path"][0])) > 1e-4  # LM moved
        lm = rec["path_cost"][:-1]  # accepted LM steps never raise the cost (the last is Gauss-Newton)
        assert all(b <= a * (1 + 1e-5) + 1e-7 for a, b in zip(lm, lm[1:], strict=False)), lm
        assert rec["final_anchor_cost"] > 0
    # the chosen sample is what refine returns with the same generator and number of samples
    chosen = [rec for rec in out["samples"] if rec["chosen"]]
    refined = refiner.refine(obs, base[None], torch.Generator().manual_seed(2))
    assert len(chosen) == 1
    assert refiner.to_flat(refined)[0].tolist() == pytest.approx(chosen[0]["solution_window"], abs=1e-5)


def test_pictures_with_and_without_the_anchor(toy, tmp_path):
    refiner, obs, base, expert = toy
    free = variant(refiner, anchor="none", proximity_weight=0.0)
    sizes = {}
    for name, r in (("anchored", refiner), ("free", free)):
        out = inspect_window(r, obs, base, expert, (0, 1), samples=SAMPLES, seed=0, grid=21)
        png = tmp_path / f"{name}.png"
        plot(out, png, f"toy {name}", action_dim=2)
        assert png.stat().st_size > 10_000 and not list(tmp_path.glob(".*tmp*"))
        sizes[name] = png_size(png)
        if r is free:
            assert all(rec["anchored"] is None for rec in out["samples"])
            assert all(rec["final_anchor_cost"] == pytest.approx(0, abs=1e-6) for rec in out["samples"])
    assert sizes["free"][0] == sizes["anchored"][0]  # one column per sample in both
    assert sizes["free"][1] < 0.7 * sizes["anchored"][1]  # one row instead of two
    with pytest.raises(ValueError, match="two different coordinates"):
        inspect_window(refiner, obs, base, expert, (0, 0))


def _stores(root):
    """Under ``root`` at the default paths: a toy demo store (4-D actions, windows H=4, To=2), init
    actions (expert + 0.1 noise) and an untrained DiffTORI refiner checkpoint for seed 0."""
    store = write_policy_store(root / "data/demos/toy.zarr", episodes=2, length=12, n_points=16)
    actions = np.asarray(store.array("action")[:])
    steps = np.arange(store.n_steps)
    idx = np.stack([np.clip(steps + k - 1, (steps // 12) * 12, (steps // 12) * 12 + 11) for k in range(4)], 1)
    noise = np.random.default_rng(0).normal(scale=0.1, size=(store.n_steps, 2, 4, 4))
    meta = InitMeta(
        demos=str(store.path), policy="pointnet_bc", checkpoint="none", weights="ema", samples=2,
        horizon=4, n_obs_steps=2, n_action_steps=3, seed=0, demos_episode_seeds=store.meta.episode_seeds,
    )  # fmt: skip
    inits = root / "data/inits/toy/pointnet_bc/seed0.zarr"
    InitActionStore.write(inits, actions[idx][:, None] + noise, store.episode_ends, meta)
    window = {"horizon": 4, "n_obs_steps": 2, "n_action_steps": 3, "encoder": TINY["encoder"]}
    config = window | {"hidden": [32, 32], "latent_dim": 4, "state_dim": 8}
    refiner = REFINERS.make("difftori", config, ShapeMeta.from_store(store))
    refiner.fit_normalizer({k: np.asarray(store.array(k)[:]) for k in store.keys})
    refiner.save(root / "models/toy/pointnet_bc-difftori/seed0")
    return refiner, actions, idx


def test_cli_end_to_end(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    refiner, actions, idx = _stores(tmp_path)
    args = ["inspect-refiner", "--task", "toy", "--policy", "pointnet_bc", "--refiner", "difftori"]
    assert main([*args, "--step", "17", "--samples", "2"]) == 0
    png = tmp_path / "results/inspect/toy/pointnet_bc-difftori/seed0/step17.png"
    assert png_size(png)[0] > 300 and png.stat().st_size > 10_000
    out = json.loads(png.with_suffix(".json").read_text())
    dims = out["dims"]
    assert len(out["samples"]) == 2 and dims[0] != dims[1]
    # by default the two coordinates whose (normalised) expert windows vary most across the store
    std = refiner.to_flat(torch.as_tensor(actions[idx])).std(0)
    assert sorted(std[dims].tolist()) == pytest.approx(sorted(std.topk(2).values.tolist())), (dims, std)
    assert std[dims].min() > 2 * std.min()
    # step 17 = episode 1, local step 5: expert actions of local steps 4..7; base = the first stored sample
    expert = refiner.to_flat(torch.as_tensor(actions[12 + 4 : 12 + 8])[None])[0]
    assert out["expert_window"] == pytest.approx(expert.tolist(), abs=1e-5)
    base = refiner.to_flat(torch.as_tensor(InitActionStore(out["init_actions"]).actions[17, 0])[None])[0]
    assert out["base"] == pytest.approx(base[dims].tolist(), abs=1e-5)
    # a grid value is the loaded refiner's objective at that slice point, for the obs of steps 16, 17
    loaded, rec = REFINERS.load(out["checkpoint"]), out["samples"][0]
    obs = {
        k: torch.as_tensor(np.asarray(EpisodeStore(tmp_path / "data/demos/toy.zarr").array(k)[16:18]))[None]
        for k in loaded.obs_keys
    }
    ctx = loaded.context(torch.tensor([rec["latent"]]), loaded.encode_obs(obs), base[None])
    x = base.clone()[None]
    x[0, dims[0]], x[0, dims[1]] = out["grid"]["u"][5], out["grid"]["v"][3]
    with torch.no_grad():
        assert rec["objective"][3][5] == pytest.approx(float(loaded.objective_value(x, ctx)), rel=1e-4)
    assert "final objective" in caplog.text and "anchor cost" in caplog.text
    # chosen dims; errors name the missing file or the bad step, exit 1
    assert main([*args, "--step", "3", "--dims", "2", "9", "--out", "x/p.png"]) == 0
    assert json.loads((tmp_path / "x/p.json").read_text())["dims"] == [2, 9]
    assert main([*args, "--step", "3", "--seed", "1"]) == 1
    assert "models/toy/pointnet_bc-difftori/seed1: refiner checkpoint not found" in caplog.text
    assert main([*args, "--step", "24"]) == 1
    assert "step 24 out of range 0..23" in caplog.text
