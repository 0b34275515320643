"""Cross-fitted init actions: every fold's windows come from a base that never trained on it."""

import numpy as np
import pytest
import torch
from difftori.base_policies import load_policy
from difftori.datasets.windows import WindowDataset
from difftori.pipeline.init_actions import InitActionsConfig, fold_split, init_actions_stage
from difftori.pipeline.train_base import train_base
from difftori.pipeline.training import TrainConfig
from store_helpers import TINY_CONFIGS, write_policy_store

CFG = TrainConfig(max_steps=6, batch_size=16, lr=1e-3, val_every_steps=6, num_threads=1, ema=False)


def test_fold_split_partitions_and_is_seeded():
    folds = fold_split([0, 2, 3, 5, 7, 8, 9], 3, seed=0)
    assert sorted(e for f in folds for e in f) == [0, 2, 3, 5, 7, 8, 9]
    assert sorted(len(f) for f in folds) == [2, 2, 3]
    assert fold_split([0, 2, 3, 5, 7, 8, 9], 3, seed=0) == folds
    assert fold_split([0, 2, 3, 5, 7, 8, 9], 3, seed=1) != folds
    with pytest.raises(ValueError, match="2 <= k <= the 2 training episodes"):
        fold_split([1, 2], 3, seed=0)
    with pytest.raises(ValueError, match="cross_fit must be 0"):
        InitActionsConfig(cross_fit=1)


def _predict(model, store, episodes):
    policy = load_policy(model, weights="raw")
    data = WindowDataset(store, policy.obs_keys, policy.horizon, policy.n_obs_steps, episodes=episodes)
    obs = {k: torch.stack([data[i]["obs"][k] for i in range(len(data))]) for k in policy.obs_keys}
    return data.steps, policy.predict_action_chunk(obs).numpy()


def test_cross_fitted_windows_come_from_the_base_without_that_fold(tmp_path):
    """PointNet-BC is deterministic and training is seeded, so a fold base retrained by hand
    reproduces the stage's windows exactly; validation windows are the main checkpoint's."""
    store = write_policy_store(tmp_path / "toy.zarr", episodes=5, length=12)
    main = tmp_path / "base"
    pcfg = TINY_CONFIGS["pointnet_bc"]
    summary = train_base("toy", "pointnet_bc", store.path, main, pcfg, CFG, progress=False)
    train_eps, val_eps = summary["train_episodes"], summary["val_episodes"]
    cfg = InitActionsConfig(samples=2, weights="raw", cross_fit=2)
    out = tmp_path / "inits.zarr"
    inits = init_actions_stage("toy", store.path, main, out, cfg, 0, pcfg, CFG)
    actions = inits.actions[:]
    assert not out.with_name("inits.zarr.work").exists()
    assert sorted(e for f in inits.meta.folds for e in f) == train_eps
    assert inits.meta.folds == fold_split(train_eps, 2, CFG.seed)

    steps, direct = _predict(main, store, val_eps)
    np.testing.assert_allclose(actions[steps, 0], direct, atol=1e-6)
    for j, fold in enumerate(inits.meta.folds):
        keep = [e for e in train_eps if e not in fold]
        fold_model = tmp_path / f"by_hand{j}"
        split = (keep, val_eps)
        train_base("toy", "pointnet_bc", store.path, fold_model, pcfg, CFG, progress=False, split=split)
        steps, direct = _predict(fold_model, store, fold)
        np.testing.assert_allclose(actions[steps, 1], direct, atol=1e-6)
        _, from_main = _predict(main, store, fold)
        assert not np.allclose(actions[steps, 0], from_main, atol=1e-3)  # not the main base's windows

    plain_cfg = InitActionsConfig(samples=2, weights="raw")
    plain = init_actions_stage("toy", store.path, main, tmp_path / "plain.zarr", plain_cfg, 0)
    assert plain.meta.folds == []
    steps, direct = _predict(main, store, train_eps)
    np.testing.assert_allclose(plain.actions[:][steps, 0], direct, atol=1e-6)


@pytest.mark.parametrize("name", ["residual", "difftori", "ibc"])
def test_init_noise_perturbs_only_the_training_starts(name):
    """``init_noise`` adds N(0, sigma^2) in normalised units to the picked stored window; 0 keeps it."""
    from refiner_helpers import biased_data, make

    data = biased_data(4000, seed=0)
    torch.manual_seed(0)
    plain = make(name, data).pick_init(data)
    np.testing.assert_array_equal(plain.numpy(), data["init_action"][:, 0].numpy())
    noisy = make(name, data, init_noise=0.5)
    torch.manual_seed(0)
    delta = noisy.to_flat(noisy.pick_init(data)) - noisy.to_flat(data["init_action"][:, 0])
    assert abs(float(delta.std()) - 0.5) < 0.02 and abs(float(delta.mean())) < 0.02
