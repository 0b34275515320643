"""Lightning training (seeded, resumable, EMA), the train-base and init-actions stages and CLI."""

import json

import numpy as np
import pytest
import torch
import yaml
from difftori.base_policies import ShapeMeta, load_policy, make_policy
from difftori.base_policies.checkpoint import CheckpointError
from difftori.datasets.episode_store import EpisodeStore, StoreError
from difftori.datasets.init_action_store import InitActionStore
from difftori.datasets.windows import WindowDataset
from difftori.pipeline.cli import main
from difftori.pipeline.init_actions import compute_init_actions
from difftori.pipeline.train_base import split_episodes, store_split, train_base
from difftori.pipeline.training import LitTrainer, TrainConfig, fit
from store_helpers import TINY_CONFIGS, write_policy_store

CFG = TrainConfig(max_steps=12, batch_size=16, lr=1e-3, val_every_steps=6, num_threads=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_policy_store(tmp_path_factory.mktemp("toy") / "toy.zarr", episodes=4, length=16)


def test_split_is_by_episode_and_seeded():
    train, val = split_episodes(10, 1, seed=0)
    assert len(val) == 1 and sorted(train + val) == list(range(10))
    assert split_episodes(10, 1, seed=0) == (train, val)
    assert split_episodes(10, 2, seed=1) != split_episodes(10, 2, seed=2)
    assert split_episodes(1, 1, seed=0) == ([0], [])


def _lit(store, cfg):
    torch.manual_seed(cfg.seed)
    policy = make_policy("dp3", TINY_CONFIGS["dp3"], ShapeMeta.from_store(store))
    data = WindowDataset(store, policy.obs_keys, policy.horizon, policy.n_obs_steps, episodes=[0, 1, 2])
    val = WindowDataset(store, policy.obs_keys, policy.horizon, policy.n_obs_steps, episodes=[3])
    policy.fit_normalizer(data.arrays())
    return LitTrainer(policy, cfg), data, val


def test_training_is_seeded_and_resumes(store, tmp_path):
    """A run stopped after 6 of 12 steps (two epochs of 3 batches) and resumed from its last
    checkpoint ends where an uninterrupted run ends: same step count, weights and EMA."""
    lit, data, val = _lit(store, CFG)
    whole = fit(lit, data, val, tmp_path / "whole", progress=False)
    assert whole["steps"] == 12 and not whole["resumed"]
    assert {"val/loss", "val/action_mse"} <= set(whole["metrics"])

    first, data, val = _lit(store, CFG.__class__(**{**CFG.__dict__, "max_steps": 6}))
    fit(first, data, val, tmp_path / "split", progress=False)
    second, data, val = _lit(store, CFG)
    resumed = fit(second, data, val, tmp_path / "split", progress=False)
    assert resumed["resumed"] and resumed["steps"] == 12
    for (k, a), b in zip(lit.module.state_dict().items(), second.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    ema_a, ema_b = lit.ema_state_dict(), second.ema_state_dict()
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], msg=k)
    assert not torch.equal(ema_a["model.out.weight"], lit.module.state_dict()["model.out.weight"])
    loss_log = (tmp_path / "whole" / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert loss_log.splitlines()[0].split("\t") == ["step", "loss"]


def test_train_base_writes_a_loadable_checkpoint(store, tmp_path):
    out = tmp_path / "models" / "dp3"
    summary = train_base("toy", "dp3", store.path, out, TINY_CONFIGS["dp3"], CFG, progress=False)
    assert summary["steps"] == 12 and len(summary["val_episodes"]) == 1
    assert not out.with_name("dp3.work").exists()
    assert (out / "dvclive" / "plots" / "metrics" / "val" / "action_mse.tsv").exists()
    policy = load_policy(out)
    assert policy.weights == "ema" and policy.info["task"] == "toy"
    assert policy.info["summary"]["metrics"]["val/action_mse"] == summary["metrics"]["val/action_mse"]


@pytest.mark.parametrize("name", ["dp3", "pointnet_bc"])
def test_init_actions_are_aligned_with_the_demos(store, tmp_path, name):
    policy = make_policy(name, TINY_CONFIGS[name], ShapeMeta.from_store(store))
    data = WindowDataset(store, policy.obs_keys, policy.horizon, policy.n_obs_steps)
    policy.fit_normalizer(data.arrays())
    policy.save(tmp_path / "m")
    inits = compute_init_actions(
        store.path, tmp_path / "m", tmp_path / "i.zarr", samples=3, seed=0, batch_size=10
    )
    assert inits.actions.shape == (store.n_steps, 3, policy.horizon, 4)
    np.testing.assert_array_equal(inits.episode_ends, store.episode_ends)
    inits.check_aligned(store)
    assert (inits.meta.policy, inits.meta.weights, inits.meta.samples) == (name, "raw", 3)
    # row t holds the policy's prediction for the window anchored at step t
    t = int(store.episode_ends[1]) + 5  # step 5 of episode 2
    obs = {k: v[None] for k, v in data[t]["obs"].items()}
    policy = load_policy(tmp_path / "m")
    a = inits.actions[:]
    if name == "pointnet_bc":  # deterministic: every sample equals the direct prediction
        direct = policy.predict_action_chunk(obs).numpy()[0]
        for k in range(3):
            np.testing.assert_allclose(a[t, k], direct, rtol=1e-5, atol=1e-5)
        assert not np.allclose(a[t], a[t - 5])
    else:  # stochastic: samples differ, and the same seed reproduces them
        assert not np.allclose(a[t, 0], a[t, 1])
        again = compute_init_actions(
            store.path, tmp_path / "m", tmp_path / "j.zarr", samples=3, seed=0, batch_size=10
        )
        np.testing.assert_array_equal(again.actions[:], a)


def test_init_actions_misaligned_store_is_refused(store, tmp_path):
    policy = make_policy("pointnet_bc", TINY_CONFIGS["pointnet_bc"], ShapeMeta.from_store(store))
    policy.save(tmp_path / "m")
    inits = compute_init_actions(store.path, tmp_path / "m", tmp_path / "i.zarr", samples=1)
    other = write_policy_store(tmp_path / "other.zarr", episodes=3, length=16)
    with pytest.raises(StoreError, match="not aligned"):
        inits.check_aligned(other)


def test_cli_train_base_init_actions_and_import(store, tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "train_base": {"max_steps": 4, "batch_size": 16, "val_every_steps": 4, "num_threads": 1},
                "policies": {"pointnet_bc": TINY_CONFIGS["pointnet_bc"]},
                "init_actions": {"samples": 2},
            }
        )
    )
    out = tmp_path / "models" / "pb"
    args = ["--task", "toy", "--policy", "pointnet_bc", "--params", str(params), "--demos", str(store.path)]
    assert main(["train-base", *args, "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    inits = tmp_path / "inits.zarr"
    assert main(["init-actions", *args, "--model", str(out), "--out", str(inits)]) == 0
    assert InitActionStore(inits).actions.shape == (store.n_steps, 2, 4, 4)
    # loading instead of training: the checkpoint is validated and copied
    imported = tmp_path / "models" / "imported"
    assert main(["train-base", *args, "--out", str(imported), "--checkpoint", str(out)]) == 0
    assert (imported / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # a checkpoint of another policy is refused, with a message naming it
    dp3_args = ["--task", "toy", "--policy", "dp3", *args[4:]]
    assert main(["train-base", *dp3_args, "--out", str(tmp_path / "x"), "--checkpoint", str(out)]) == 1
    assert "holds a 'pointnet_bc' policy, expected 'dp3'" in caplog.text
    # bad params are named
    params.write_text(yaml.safe_dump({"train_base": {"max_step": 4}}))
    assert main(["train-base", *args, "--out", str(tmp_path / "y")]) == 1
    assert "train_base: unknown keys ['max_step']" in caplog.text


def test_import_rejects_mismatched_observations(store, tmp_path):
    from difftori.pipeline.train_base import import_checkpoint

    policy = make_policy("pointnet_bc", TINY_CONFIGS["pointnet_bc"], ShapeMeta.from_store(store))
    policy.save(tmp_path / "m")
    other = write_policy_store(tmp_path / "o.zarr", episodes=2, length=8, n_points=16)
    with pytest.raises(CheckpointError, match="observation 'point_cloud'"):
        import_checkpoint(tmp_path / "m", tmp_path / "out", "pointnet_bc", other.path)


@pytest.mark.parametrize("refiner", ["difftori", "residual", "ibc"])
def test_cli_train_refiner_end_to_end(store, tmp_path, refiner):
    """base -> init-actions -> train-refiner through the CLI; the refiner reuses the base's split
    and composes with the base into a policy."""
    from difftori.refiners import REFINERS, RefinedPolicy

    small = {"encoder": TINY_CONFIGS["pointnet_bc"]["encoder"], "hidden": [32, 32]}
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "train_base": {
                    "max_steps": 4,
                    "batch_size": 16,
                    "val_every_steps": 4,
                    "num_threads": 1,
                    "seed": 3,
                },
                "train_refiner": {"max_steps": 3, "batch_size": 16, "val_every_steps": 3, "num_threads": 1},
                "policies": {"pointnet_bc": TINY_CONFIGS["pointnet_bc"]},
                "refiner_configs": {refiner: small},
                "init_actions": {"samples": 2},
            }
        )
    )
    common = ["--task", "toy", "--policy", "pointnet_bc", "--params", str(params), "--demos", str(store.path)]
    base, inits, out = tmp_path / "base", tmp_path / "inits.zarr", tmp_path / "ref"
    assert main(["train-base", *common, "--out", str(base), "--no-progress"]) == 0
    assert main(["init-actions", *common, "--model", str(base), "--out", str(inits)]) == 0
    args = [*common, "--refiner", refiner, "--inits", str(inits), "--out", str(out), "--no-progress"]
    assert main(["train-refiner", *args]) == 0
    loaded = REFINERS.load(out)
    base_info = load_policy(base).info["summary"]
    assert loaded.info["summary"]["val_episodes"] == base_info["val_episodes"]
    assert loaded.info["base_policy"] == "pointnet_bc" and loaded.config.horizon == 4
    assert {"val/action_mse", "val/init_action_mse"} <= set(loaded.info["summary"]["metrics"])
    policy = RefinedPolicy(load_policy(base), loaded)
    obs = {k: v[None] for k, v in WindowDataset(store, policy.obs_keys, 4, 2)[0]["obs"].items()}
    assert policy.predict_action(obs, torch.Generator().manual_seed(0)).shape == (1, 3, 4)


def test_a_stores_own_train_valid_split_is_used(tmp_path):
    """A converted robomimic file's mask/train and mask/valid decide the validation episodes."""
    plain = write_policy_store(tmp_path / "plain.zarr", episodes=4, length=8)
    cfg = TrainConfig(val_episodes=1, seed=3)
    assert store_split(plain, cfg) == split_episodes(4, 1, 3)
    meta = plain.meta
    meta.splits = {"train": [0, 2, 3], "valid": [1]}
    meta.checksums = {}
    with EpisodeStore.create(tmp_path / "split.zarr", meta) as w:
        for e in range(4):
            w.add_episode(plain.episode(e), seed=e)
    assert store_split(EpisodeStore(tmp_path / "split.zarr"), cfg) == ([0, 2, 3], [1])
