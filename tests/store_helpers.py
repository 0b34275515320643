"""Small stores for tests."""

import numpy as np
from difftori.datasets.episode_store import StoreMeta


def small_meta(**overrides) -> StoreMeta:
    """Metadata of a toy store with a point cloud, a low-dim state and 4-D actions."""
    kw = dict(
        task="toy",
        source="test",
        obs_kinds={"point_cloud": "point_cloud", "state": "lowdim"},
        action_low=[-1.0] * 4,
        action_high=[1.0] * 4,
        control_mode="ee_delta_pos+gripper",
        params={"seed": 0},
    )
    kw.update(overrides)
    return StoreMeta(**kw)


def small_episode(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    return {
        "point_cloud": rng.normal(size=(length, 16, 3)).astype(np.float32),
        "state": rng.normal(size=(length, 5)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
    }


def write_policy_store(path, episodes: int = 3, length: int = 24, n_points: int = 32, seed: int = 0):
    """A store whose actions are a smooth function of the observations (so policies can fit it).

    Each episode has a phase p; ``agent_pos`` = (sin(0.3t+p), cos(0.3t+p), p, 0), the point cloud
    is a blob centred at (p, 0, 0), and the action is 0.8 * (sin(0.3(t+1)+p), cos(0.3(t+1)+p), p/2, 1).
    """
    from difftori.datasets.episode_store import EpisodeStore

    rng = np.random.default_rng(seed)
    meta = StoreMeta(
        task="toy",
        suite="metaworld",  # for the suite's metric and step limit; the toy task has no env
        source="test",
        obs_kinds={"point_cloud": "point_cloud", "agent_pos": "lowdim", "state": "lowdim"},
        action_low=[-1.0] * 4,
        action_high=[1.0] * 4,
        control_mode="ee_delta_pos+gripper",
    )
    with EpisodeStore.create(path, meta, overwrite=True) as w:
        for e in range(episodes):
            p = -0.8 + 1.6 * e / max(1, episodes - 1)
            t = np.arange(length)
            agent = np.stack(
                [np.sin(0.3 * t + p), np.cos(0.3 * t + p), np.full(length, p), np.zeros(length)], 1
            )
            cloud = rng.normal(scale=0.05, size=(length, n_points, 3)) + np.array([p, 0.0, 0.0])
            action = 0.8 * np.stack(
                [
                    np.sin(0.3 * (t + 1) + p),
                    np.cos(0.3 * (t + 1) + p),
                    np.full(length, p / 2),
                    np.ones(length),
                ],
                1,
            )
            w.add_episode(
                {
                    "point_cloud": cloud.astype(np.float32),
                    "agent_pos": agent.astype(np.float32),
                    "state": np.concatenate([agent, agent**2], 1).astype(np.float32),
                    "action": action.astype(np.float32),
                },
                seed=e,
            )
    return EpisodeStore(path)


# Small networks for fast tests (same code paths as the real defaults).
TINY = {
    "encoder": {"point_hidden": [16, 32], "point_out": 16, "lowdim_hidden": [32, 32]},
    "down_dims": [16, 32],
    "step_embed_dim": 16,
}
TINY_CONFIGS = {
    "dp3": TINY,
    "diffusion": TINY,
    "pointnet_bc": {"encoder": TINY["encoder"], "hidden": [64, 64]},
    "bc_rnn": {"rnn_hidden_dim": 32, "seq_length": 5},
}
