"""BC-RNN: robomimic's algorithm behind our contract, its recurrence, and recurrent init actions."""

import numpy as np
import pytest
import torch
from difftori.base_policies import ShapeMeta, load_policy, make_policy
from difftori.datasets.init_action_store import InitActionStore
from difftori.datasets.windows import WindowDataset
from difftori.eval.rollout import PolicyEpisodeBatch, envs_for
from difftori.pipeline.init_actions import compute_init_actions
from difftori.pipeline.train_base import train_base
from difftori.pipeline.training import TrainConfig
from difftori.refiners import RefinedPolicy
from difftori.refiners.residual import ResidualConfig, ResidualRefiner
from store_helpers import TINY_CONFIGS, write_policy_store

torch.set_num_threads(1)
SEQ = TINY_CONFIGS["bc_rnn"]["seq_length"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_policy_store(tmp_path_factory.mktemp("toy") / "toy.zarr", episodes=3, length=24)


def build(store, **overrides):
    policy = make_policy("bc_rnn", TINY_CONFIGS["bc_rnn"] | overrides, ShapeMeta.from_store(store))
    policy.fit_normalizer(WindowDataset(store, policy.obs_keys, *policy.train_window()).arrays())
    return policy.eval()


def step_obs(store, policy, episode, t):
    """The observation of step ``t`` of ``episode`` as a (1, 1, ...) batch."""
    ep = store.episode(episode)
    return {k: torch.from_numpy(ep[k][t : t + 1])[None] for k in policy.obs_keys}


def live(policy, store, episode, steps, generator=None):
    """The actions a rollout gets feeding steps 0..steps-1 of ``episode`` in order: (steps, Da)."""
    policy.reset()
    return torch.cat(
        [
            policy.predict_action_chunk(step_obs(store, policy, episode, t), generator)[:, 0]
            for t in range(steps)
        ]
    )


def test_it_is_robomimics_bc_rnn_and_steps_as_robomimic_does(store):
    """robomimic's own algorithm class and network; step by step, our actions equal robomimic's
    ``get_action`` on the same normalised observations, across its state resets every seq_length."""
    policy = build(store)
    assert type(policy._algo).__name__ == "BC_RNN" and type(policy.net).__name__ == "RNNActorNetwork"
    steps = 2 * SEQ + 2
    ours = live(policy, store, 1, steps)
    algo = policy._algo
    algo.set_eval()
    algo.reset()
    theirs = []
    for t in range(steps):
        obs = {k: v[:, 0] for k, v in policy.normalize_obs(step_obs(store, policy, 1, t)).items()}
        with torch.no_grad():
            theirs.append(policy.normalizer.unnormalize("action", algo.get_action(obs)))
    torch.testing.assert_close(ours, torch.cat(theirs), atol=1e-6, rtol=0)


def test_gmm_head_samples_per_episode_generator(store):
    """With robomimic's GMM head (BC_RNN_GMM) each row draws from its own generator, and every
    draw lies within the low-noise scale (1e-4) of one of the mixture's mode means."""
    policy = build(store, gmm=True)
    assert type(policy._algo).__name__ == "BC_RNN_GMM"
    obs = {k: v.repeat(3, 1, 1) for k, v in step_obs(store, policy, 0, 0).items()}
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    policy.reset()
    batch = policy.predict_action_chunk(obs, gens)[:, 0]
    for i, s in enumerate((1, 2, 3)):
        policy.reset()
        alone = policy.predict_action_chunk(step_obs(store, policy, 0, 0), torch.Generator().manual_seed(s))
        torch.testing.assert_close(batch[i : i + 1], alone[:, 0])
    with torch.no_grad():
        one = {k: v[:, 0] for k, v in policy.normalize_obs(step_obs(store, policy, 0, 0)).items()}
        dist, _ = policy.net.forward_train_step(one)
    means = policy.normalizer.unnormalize("action", dist.component_distribution.base_dist.loc[0])  # (K, Da)
    gap = (batch[:, None] - means[None]).abs().amax(-1).amin(-1)
    assert (gap < 1e-3).all(), gap


def test_the_state_is_carried_and_reset(store):
    policy = build(store)
    a = live(policy, store, 0, SEQ + 3)
    b = live(policy, store, 0, SEQ + 3)
    assert torch.equal(a, b)  # reset() starts the episode afresh
    fresh = torch.cat(
        [
            (policy.reset(), policy.predict_action_chunk(step_obs(store, policy, 0, t)))[1][:, 0]
            for t in range(SEQ + 3)
        ]
    )
    assert not torch.allclose(a[1:SEQ], fresh[1:SEQ])  # within a sequence the state matters
    torch.testing.assert_close(a[SEQ], fresh[SEQ])  # robomimic restarts the state every seq_length
    policy.reset()
    policy.predict_action_chunk(step_obs(store, policy, 0, 0))
    two = {k: v.repeat(2, 1, 1) for k, v in step_obs(store, policy, 0, 1).items()}
    with pytest.raises(ValueError, match="a batch of 2 after 1 within an episode"):
        policy.predict_action_chunk(two)


def test_image_keys_are_refused_with_the_key_named():
    sm = ShapeMeta(
        obs={"image": {"shape": [3, 8, 8], "kind": "image"}, "s": {"shape": [2], "kind": "lowdim"}},
        action_dim=2,
    )
    with pytest.raises(ValueError, match="observation key 'image' is image; bc_rnn takes low-dim keys only"):
        make_policy("bc_rnn", {"obs_keys": ["image", "s"]}, sm)
    with pytest.raises(ValueError, match="horizon, n_obs_steps and n_action_steps must be 1"):
        make_policy("bc_rnn", {"horizon": 4}, sm)


def test_trained_with_lightning_then_init_actions_walk_each_episode_in_order(store, tmp_path):
    """train-base trains on sequences and checkpoints it; the stored init of step t equals what a
    live rollout gets after feeding steps 0..t in order (the hidden state carried)."""
    cfg = TrainConfig(max_steps=40, batch_size=16, lr=3e-3, val_every_steps=20, val_episodes=1, num_threads=1)
    summary = train_base(
        "toy", "bc_rnn", store.path, tmp_path / "m", TINY_CONFIGS["bc_rnn"], cfg, progress=False
    )
    assert np.isfinite(summary["metrics"]["val/action_mse"])
    out = compute_init_actions(store.path, tmp_path / "m", tmp_path / "inits.zarr", samples=2, seed=0)
    assert isinstance(out, InitActionStore) and out.meta.horizon == 1 and out.meta.n_obs_steps == 1
    stored = np.asarray(out.actions[:])
    policy = load_policy(tmp_path / "m")
    starts = np.concatenate([[0], store.episode_ends[:-1]])
    for episode, t in [(0, 0), (1, SEQ - 1), (2, SEQ + 2), (2, 23)]:
        want = live(policy, store, episode, t + 1)[-1]
        for k in range(2):
            torch.testing.assert_close(torch.from_numpy(stored[starts[episode] + t, k, 0]), want)
    policy.reset()
    alone = policy.predict_action_chunk(step_obs(store, policy, 2, SEQ + 2))[0, 0]
    assert not torch.allclose(torch.from_numpy(stored[starts[2] + SEQ + 2, 0, 0]), alone)


class CountingRefiner(ResidualRefiner):
    resets = 0

    def reset(self) -> None:
        CountingRefiner.resets += 1


def test_refined_recurrent_policy_resets_both_parts_and_gets_one_env(store):
    base = build(store)
    refiner = CountingRefiner(
        ResidualConfig(horizon=1, n_obs_steps=1, n_action_steps=1), ShapeMeta.from_store(store)
    )
    policy = RefinedPolicy(base, refiner.eval())
    assert policy.recurrent and envs_for(policy, 8) == 1 and envs_for(refiner, 8) == 8
    base.predict_action_chunk(step_obs(store, base, 0, 0))
    policy.reset()
    assert base._state is None and CountingRefiner.resets == 1
    with pytest.raises(ValueError, match="a recurrent policy steps one env at a time, got 2"):
        PolicyEpisodeBatch([object(), object()], policy)
