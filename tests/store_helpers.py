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
