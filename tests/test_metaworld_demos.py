"""MetaWorld demo generation through the real simulator: success, determinism, sane point clouds."""

import numpy as np
import pytest
import zarr
from difftori.eval.demos import DemoConfig, generate_demos
from difftori.eval.suites import get_suite
from difftori.eval.suites.metaworld import MetaWorldEnv, MetaWorldObsConfig, make_env

TASK = "shelf-place"
CFG = DemoConfig(suite="metaworld", task=TASK, episodes=2, seed=3, max_episode_steps=150)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("demos")
    return generate_demos(CFG, d / "a.zarr"), generate_demos(CFG, d / "b.zarr")


def test_store_contents_and_metadata(stores):
    store = stores[0]
    assert store.n_episodes == 2 and store.zarr_format == 2
    assert store.keys == ["action", "agent_pos", "point_cloud", "state"]
    ep = store.episode(0)
    t = store.episode_lengths[0]
    assert ep["point_cloud"].shape == (t, 512, 3) and ep["point_cloud"].dtype == np.float32
    assert ep["agent_pos"].shape == (t, 4) and ep["state"].shape == (t, 39)
    assert ep["action"].shape == (t, 4)
    np.testing.assert_array_equal(ep["agent_pos"], ep["state"][:, :4])
    actions = store.array("action")[:]
    assert np.abs(actions).max() <= 1.0  # the executed (clipped) actions are recorded
    assert np.isclose(np.abs(actions[:, :3]), 1.0).any()  # the expert does saturate them
    m = store.meta
    assert (m.task, m.suite, m.source) == (TASK, "metaworld", "metaworld-expert")
    assert m.obs_kinds == {"point_cloud": "point_cloud", "agent_pos": "lowdim", "state": "lowdim"}
    assert m.action_low == [-1.0] * 4 and m.action_high == [1.0] * 4
    assert m.params["seed"] == 3 and m.params["episodes"] == 2
    assert len(m.episode_seeds) == 2 and m.n_attempts >= 2
    assert m.episode_seeds == [s for s in CFG.attempt_seeds() if s in m.episode_seeds][:2]
    # diffusion_policy's replay-buffer layout, readable with plain zarr
    root = zarr.open_group(str(store.path), mode="r")
    assert root["meta/episode_ends"][:].tolist() == store.episode_ends.tolist()
    assert root["data/point_cloud"].shape == (store.n_steps, 512, 3)


def test_same_seed_gives_identical_demos(stores):
    a, b = stores
    assert a.meta.episode_seeds == b.meta.episode_seeds
    for key in a.keys:
        np.testing.assert_array_equal(a.array(key)[:], b.array(key)[:])


def test_kept_episodes_replay_to_success(stores):
    """Open-loop replay of the recorded actions from the recorded seed succeeds on the last step."""
    store = stores[0]
    env = MetaWorldEnv(TASK, obs=MetaWorldObsConfig(n_points=64))
    try:
        for i, seed in enumerate(store.meta.episode_seeds):
            ep = store.episode(i, keys=["action", "state"])
            obs, _ = env.reset(seed=seed)
            np.testing.assert_array_equal(obs["state"], ep["state"][0])
            for t, a in enumerate(ep["action"]):
                obs, _, terminated, truncated, info = env.step(a)
                assert not truncated
                assert terminated == (t == len(ep["action"]) - 1)
            assert info["success"]
    finally:
        env.close()


def test_point_clouds_are_in_the_box_and_see_the_object(stores):
    store = stores[0]
    box = MetaWorldObsConfig().crop
    pc = store.array("point_cloud")[:]
    assert box.contains(pc.reshape(-1, 3), tol=1e-5).all()
    env = make_env(TASK)
    try:
        for i, seed in enumerate(store.meta.episode_seeds):
            env.reset(seed=seed)
            obj = env.object_position()
            first = store.episode(i, keys=["point_cloud"])["point_cloud"][0]
            dist = np.linalg.norm(first - obj, axis=1)
            # the puck (about 4 cm wide) is seen: points on its surface, not only elsewhere
            assert (dist < 0.04).sum() >= 1, dist.min()
            assert np.median(dist) > 0.15
    finally:
        env.close()


def test_point_cloud_follows_the_object(stores):
    """Moving the object in the simulator moves the points near it (back-projection is live).

    A dense cloud (4096 points) so that the 4 cm puck is sampled wherever it stands.
    """
    env = MetaWorldEnv(TASK, obs=MetaWorldObsConfig(n_points=4096))
    try:
        env.reset(seed=0)
        obj = env.object_position()
        before = env.point_cloud()
        sim = env.sim
        qpos = sim.data.qpos.copy()
        qpos[9:12] = obj + np.array([0.15, 0.0, 0.0])  # the puck's free joint
        sim.set_state(qpos, sim.data.qvel.copy())
        after = env.point_cloud()
        near = lambda pc, p: (np.linalg.norm(pc - p, axis=1) < 0.04).sum()  # noqa: E731
        assert near(before, obj) >= 1 and near(after, obj) == 0
        assert near(after, obj + np.array([0.15, 0.0, 0.0])) >= 1
    finally:
        env.close()


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: .*shelf-place"):
        make_env("shelf-plaice")
    with pytest.raises(ValueError, match="valid tasks: .*shelf-place"):
        generate_demos(DemoConfig(suite="metaworld", task="shelf-plaice"), "never.zarr")
    with pytest.raises(ValueError, match="registered suites: .*metaworld"):
        get_suite("robosuit")


def test_demos_resume_after_interruption(stores, tmp_path, monkeypatch):
    """A run killed after one episode resumes from the partial store and gives the same demos."""
    import difftori.eval.demos as demos

    out = tmp_path / "r.zarr"
    real = demos.run_policy_episodes
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(demos, "run_policy_episodes", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_demos(CFG, out)
    assert not out.exists() and out.with_name("r.zarr.partial").exists()
    monkeypatch.setattr(demos, "run_policy_episodes", real)
    store = generate_demos(CFG, out)
    assert store.meta.episode_seeds == stores[0].meta.episode_seeds
    np.testing.assert_array_equal(store.array("action")[:], stores[0].array("action")[:])
    assert not out.with_name("r.zarr.partial").exists()


def test_optional_image_observation(tmp_path):
    cfg = DemoConfig(suite="metaworld", task="reach", episodes=1, seed=0, obs={"image": True, "n_points": 64})
    store = generate_demos(cfg, tmp_path / "img.zarr", resume=False)
    assert store.meta.obs_kinds["image"] == "image"
    img = store.episode(0, keys=["image"])["image"]
    assert img.shape[1:] == (3, 84, 84) and img.dtype == np.uint8
    assert img.std() > 10  # a rendered scene, not a blank frame
