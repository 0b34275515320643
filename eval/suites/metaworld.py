"""The MetaWorld suite: MetaWorld (V3, goal-observable) as a gymnasium env with difftori's
observation keys, MetaWorld's own scripted experts for demos, and its registration as a suite.

Observations per step:

* ``point_cloud`` (N, 3) float32: metric depth from a fixed corner camera, back-projected to the
  world frame, cropped to the workspace box, farthest-point sampled to N points (default 512);
* ``agent_pos`` (4,) float32: end-effector position and gripper opening (state[:4]);
* ``state`` (39,) float32: MetaWorld's full low-dim observation;
* ``image`` (3, H, W) uint8, only when ``image=True``.

Actions are MetaWorld's 4-D ``[dx, dy, dz, grip]`` in [-1, 1]. An episode terminates at the first
step whose ``info["success"]`` is set and is truncated after ``max_episode_steps``.
Demo generation and evaluation both see the world through this class. The suite reports success
rates; its step limit is 200 (DP3's and DiffTORI's MetaWorld setting).

Skipping work nobody reads (the same code computes every observation that is made, so the numbers
are identical): ``keys`` limits the observation to the keys a policy reads (e.g. no point cloud for
a state-only policy, no image for DP3), and ``observe = False`` makes ``step`` return an empty
observation without rendering (``MultiStepWrapper(lazy=True)`` sets it for steps whose observation
falls out of the policy's history window). Neither changes the simulation.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display; before mujoco

from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from difftori.base_policies.configs import config_from_dict  # noqa: E402
from difftori.datasets.pointcloud import CropBox, depth_to_point_cloud  # noqa: E402
from difftori.eval.suites import SUITES, Suite  # noqa: E402

if TYPE_CHECKING:
    from difftori.datasets.episode_store import EpisodeStore, StoreMeta
    from difftori.eval.demos import DemoConfig

CONTROL_MODE = "ee_delta_pos+gripper"
MAX_EPISODE_STEPS = 200  # DP3's and DiffTORI's MetaWorld episode length
# The paper's MetaWorld tasks use MetaWorld's V2 names; MetaWorld 3 ships them as V3.
_VERSION_SUFFIX = "-v3"


def metaworld_tasks() -> list[str]:
    """Every MetaWorld V3 task by its plain name (``shelf-place``, ``stick-pull``, ...)."""
    import metaworld

    names = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
    return sorted(n.removesuffix("-goal-observable").removesuffix(_VERSION_SUFFIX) for n in names)


def resolve_task(task: str) -> str:
    """Map ``shelf-place`` (or ``shelf-place-v3``) to MetaWorld's ``shelf-place-v3``; list valid names."""
    name = task.removesuffix("-goal-observable").removesuffix(_VERSION_SUFFIX)
    valid = metaworld_tasks()
    if name not in valid:
        raise ValueError(f"unknown MetaWorld task {task!r}; valid tasks: {', '.join(valid)}")
    return name + _VERSION_SUFFIX


@dataclass(frozen=True)
class MetaWorldObsConfig:
    """How observations are made. ``corner4`` is DP3's repositioned ``corner2`` camera."""

    n_points: int = 512
    camera: str = "corner4"
    depth_size: int = 128
    crop: CropBox = field(default_factory=lambda: CropBox((-0.7, 0.2, 0.005), (0.7, 1.2, 0.9)))
    image: bool = False
    image_size: int = 84

    def __post_init__(self) -> None:
        if self.n_points < 1 or self.depth_size < 8 or self.image_size < 8:
            raise ValueError(f"invalid observation config {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetaWorldEnv(gym.Env):
    """One MetaWorld task; ``reset(seed=s)`` gives the same initial state for the same ``s``."""

    metadata = {"render_modes": ["rgb_array"]}
    suite = "metaworld"
    control_mode = CONTROL_MODE

    def __init__(
        self,
        task: str,
        obs: MetaWorldObsConfig | None = None,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        keys: Sequence[str] | None = None,
    ) -> None:
        import metaworld

        self.task = resolve_task(task)
        self.obs_config = obs or MetaWorldObsConfig()
        self.max_episode_steps = max_episode_steps
        env_cls = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[self.task + "-goal-observable"]
        self._env = env_cls(seed=0)
        # Initial states from the env's own seeded generator (not numpy's global one).
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._env.max_path_length = max(self._env.max_path_length, max_episode_steps)
        model = self._env.model
        model.vis.quality.shadowsize = 0  # shadows dominate render time (measured 6x)
        model.vis.quality.offsamples = 0
        self._cam_id = model.camera(self.obs_config.camera).id
        self._depth: mujoco.Renderer | None = None
        self._rgb: mujoco.Renderer | None = None
        self._steps = 0
        self.observe = True  # False: step() returns {} and renders nothing (see the module docstring)

        cfg = self.obs_config
        spaces = {
            "point_cloud": gym.spaces.Box(-np.inf, np.inf, (cfg.n_points, 3), np.float32),
            "agent_pos": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
            "state": gym.spaces.Box(-np.inf, np.inf, (39,), np.float32),
        }
        if cfg.image:
            spaces["image"] = gym.spaces.Box(0, 255, (3, cfg.image_size, cfg.image_size), np.uint8)
        unknown = sorted(set(keys or ()) - set(spaces))
        if unknown:
            raise ValueError(
                f"{self.task}: unknown observation keys {unknown}; this env has {sorted(spaces)}"
            )
        self.keys = tuple(spaces) if keys is None else tuple(k for k in spaces if k in keys)
        self.observation_space = gym.spaces.Dict({k: spaces[k] for k in self.keys})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)

    @property
    def obs_kinds(self) -> dict[str, str]:
        """Observation key -> kind, as the episode store records it."""
        kinds = {"point_cloud": "point_cloud", "agent_pos": "lowdim", "state": "lowdim", "image": "image"}
        return {k: kinds[k] for k in self.keys}

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        state, _ = self._env.reset()
        self._steps = 0
        return self._observe(state), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        state, reward, _, _, info = self._env.step(action)
        self._steps += 1
        success = bool(info["success"])
        truncated = self._steps >= self.max_episode_steps and not success
        obs = self._observe(state) if self.observe else {}
        return obs, float(reward), success, truncated, {**info, "success": success}

    def render(self) -> np.ndarray:
        """RGB frame (H, W, 3) from the observation camera, for videos."""
        return self._render_rgb().transpose(1, 2, 0)

    def close(self) -> None:
        for r in (self._depth, self._rgb):
            if r is not None:
                r.close()
        self._depth = self._rgb = None
        self._env.close()

    # -- simulator state, for tests and benchmarks ------------------------------------------------
    @property
    def sim(self) -> Any:
        """The wrapped MetaWorld env (raw 39-D observations, no rendering)."""
        return self._env

    def object_position(self) -> np.ndarray:
        """World position (3,) of the task's main object."""
        return np.array(self._env._get_pos_objects()[:3], dtype=np.float64)  # a copy, not a view

    # -- observation ----------------------------------------------------------------------------
    def _observe(self, state: np.ndarray) -> dict[str, np.ndarray]:
        make = {
            "point_cloud": self.point_cloud,
            "agent_pos": lambda: state[:4].astype(np.float32),
            "state": lambda: state.astype(np.float32),
            "image": self._render_rgb,
        }
        return {k: make[k]() for k in self.keys}

    def point_cloud(self) -> np.ndarray:
        """Render depth (metres) and turn it into the cropped, sampled world-frame cloud."""
        cfg = self.obs_config
        if self._depth is None:
            self._depth = mujoco.Renderer(self._env.model, cfg.depth_size, cfg.depth_size)
            self._depth.enable_depth_rendering()
        self._depth.update_scene(self._env.data, camera=self._cam_id)
        depth = self._depth.render()
        data, model = self._env.data, self._env.model
        return depth_to_point_cloud(
            depth,
            float(model.cam_fovy[self._cam_id]),
            data.cam_xpos[self._cam_id],
            data.cam_xmat[self._cam_id],
            cfg.crop,
            cfg.n_points,
        )

    def _render_rgb(self) -> np.ndarray:
        size = self.obs_config.image_size
        if self._rgb is None:
            self._rgb = mujoco.Renderer(self._env.model, size, size)
        self._rgb.update_scene(self._env.data, camera=self._cam_id)
        return np.ascontiguousarray(self._rgb.render().transpose(2, 0, 1))


class MetaWorldExpert:
    """MetaWorld's own scripted policy for a task (``metaworld.policies``), acting on ``state``."""

    def __init__(self, task: str) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        self._policy = ENV_POLICY_MAP[resolve_task(task)]()

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self._policy.get_action(obs["state"].astype(np.float64)), dtype=np.float32)


def make_env(
    task: str, obs: dict[str, Any] | None = None, max_episode_steps: int = MAX_EPISODE_STEPS, **kw: Any
) -> MetaWorldEnv:
    """A :class:`MetaWorldEnv` with observation options ``obs`` (a dict, validated)."""
    cfg = config_from_dict(MetaWorldObsConfig, obs, f"{task}: obs")
    return MetaWorldEnv(task, obs=cfg, max_episode_steps=max_episode_steps, **kw)


def write_demos(cfg: DemoConfig, out: Path, overwrite: bool, resume: bool) -> EpisodeStore:
    """MetaWorld's scripted expert, recorded through :class:`MetaWorldEnv` (successes only)."""
    from difftori.eval.demos import record_expert_demos

    env = make_env(cfg.task, cfg.obs, cfg.max_episode_steps)
    return record_expert_demos(cfg, out, env, MetaWorldExpert(cfg.task), overwrite, resume)


def env_for_store(meta: StoreMeta, max_episode_steps: int, keys: Sequence[str] | None) -> MetaWorldEnv:
    """The env that made the store's demos: its task and recorded observation options."""
    return make_env(meta.task, meta.params.get("obs"), max_episode_steps, keys=keys)


SUITE = SUITES.register(
    Suite(
        name="metaworld",
        metric="success",
        obs_config=MetaWorldObsConfig,
        tasks=metaworld_tasks,
        max_episode_steps=lambda task: MAX_EPISODE_STEPS,
        write_demos=write_demos,
        env_for_store=env_for_store,
    )
)
