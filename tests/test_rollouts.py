"""Closed-loop rollouts during base training, on a real MetaWorld demo store."""

import pytest
import torch
from difftori.base_policies import load_policy
from difftori.eval.demos import DemoConfig, generate_demos
from difftori.pipeline.train_base import train_base
from difftori.pipeline.training import TrainConfig
from store_helpers import TINY_CONFIGS

STEPS = 80  # the demos' step limit, which the rollouts use too (reach: the expert needs ~50)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    cfg = DemoConfig(
        suite="metaworld", task="reach", episodes=2, max_episode_steps=STEPS, obs={"n_points": 64}
    )
    return generate_demos(cfg, tmp_path_factory.mktemp("demos") / "reach.zarr").path


def _train(demos, out, **rollouts):
    cfg = TrainConfig(max_steps=6, batch_size=16, lr=1e-3, val_every_steps=6, num_threads=1, **rollouts)
    return train_base("reach", "dp3", demos, out, TINY_CONFIGS["dp3"], cfg, progress=False)


def test_rollouts_are_logged_and_never_change_training(demos, tmp_path):
    with_rollouts = _train(demos, tmp_path / "a", rollout_every_steps=4, rollout_episodes=3)
    history = with_rollouts["rollouts"]
    assert [h["step"] for h in history] == [4, 6]  # every 4 steps, and the last step
    assert all(h["rollout/success_rate"] in (0.0, 1 / 3, 2 / 3, 1.0) for h in history)
    assert 0 <= history[0]["rollout/fit_time_s"] <= history[1]["rollout/fit_time_s"]
    curve = (tmp_path / "a" / "dvclive" / "plots" / "metrics" / "rollout" / "success_rate.tsv").read_text()
    assert [line.split("\t")[0] for line in curve.splitlines()] == ["step", "4", "6"]

    plain = _train(demos, tmp_path / "b")
    assert "rollouts" not in plain
    a, b = load_policy(tmp_path / "a", "raw").state_dict(), load_policy(tmp_path / "b", "raw").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_rollouts_match_an_evaluation_of_the_saved_checkpoint(demos, tmp_path):
    """The last rollout is the EMA policy that gets saved: evaluating the checkpoint on the same
    validation seeds gives the same successes and step counts."""
    from difftori.datasets.episode_store import EpisodeStore
    from difftori.eval.evaluate import episode_seeds, make_eval_env, run_policy_episodes

    summary = _train(demos, tmp_path / "m", rollout_every_steps=6, rollout_episodes=2, rollout_seed=3)
    meta = EpisodeStore(demos).meta
    policy = load_policy(tmp_path / "m").eval()
    seeds = episode_seeds(3, 2, exclude=set(meta.episode_seeds))
    envs = [make_eval_env(meta, STEPS, policy.n_obs_steps)]
    records = run_policy_episodes(envs, policy, list(enumerate(seeds)))
    last = summary["rollouts"][-1]
    assert last["rollout/success_rate"] == sum(r.success for r in records) / 2
    assert last["rollout/return"] == pytest.approx(sum(r.ret for r in records) / 2, rel=1e-6)
    assert last["rollout/return"] > 0  # MetaWorld's shaped reward: a real trajectory was scored


def test_refiner_rollouts_use_the_frozen_base(demos, tmp_path):
    """``train_refiner.rollout_every_steps`` rolls out RefinedPolicy(frozen base, refiner); the last
    rollout equals an evaluation of the two saved checkpoints."""
    from difftori.datasets.episode_store import EpisodeStore
    from difftori.eval.evaluate import episode_seeds, make_eval_env, run_policy_episodes
    from difftori.pipeline.init_actions import compute_init_actions
    from difftori.pipeline.train_refiner import train_refiner
    from difftori.refiners import REFINERS, RefinedPolicy

    _train(demos, tmp_path / "base")
    compute_init_actions(demos, tmp_path / "base", tmp_path / "inits.zarr", samples=2)
    small = {"encoder": TINY_CONFIGS["dp3"]["encoder"], "hidden": [16]}
    cfg = TrainConfig(
        max_steps=4,
        batch_size=16,
        val_every_steps=4,
        num_threads=1,
        rollout_every_steps=4,
        rollout_episodes=2,
    )
    summary = train_refiner(
        "reach", "residual", demos, tmp_path / "inits.zarr", tmp_path / "ref", small, cfg, progress=False
    )
    assert [h["step"] for h in summary["rollouts"]] == [4]
    policy = RefinedPolicy(load_policy(tmp_path / "base"), REFINERS.load(tmp_path / "ref")).eval()
    meta = EpisodeStore(demos).meta
    seeds = episode_seeds(cfg.rollout_seed, 2, exclude=set(meta.episode_seeds))
    records = run_policy_episodes([make_eval_env(meta, STEPS, 2)], policy, list(enumerate(seeds)))
    expected = sum(r.ret for r in records) / 2
    assert summary["rollouts"][0]["rollout/return"] == pytest.approx(expected, rel=1e-6)
