"""The robomimic suite: robosuite tasks as robomimic datasets and rollouts (metric: failure rate).

Demos (:func:`write_demos`) are made the way robomimic's own datasets are, with robosuite's and
robomimic's own tools, run unmodified:

1. a phase-based scripted expert (:mod:`.robomimic_experts`: lift, can, square; Panda, OSC_POSE
   delta actions) acts in ``robosuite.make(<env>)``, recorded by robosuite's
   ``DataCollectionWrapper``, through the evaluation runner (:class:`_RecordedEnv`, an
   ``ExpertPolicy``: float32 actions, as a policy's); attempts run from ``cfg.attempt_seeds()``
   until ``cfg.episodes`` succeed;
2. robosuite's ``gather_demonstrations_as_hdf5`` keeps the successful episodes (states, actions,
   model xml); its demos come in directory-listing order, so the groups are renamed to attempt
   order (``demo_1`` is the first kept attempt), matched by their initial state;
3. robomimic's ``scripts/conversion/convert_robosuite.py`` (env_args, num_samples, train/valid
   masks) and ``scripts/dataset_states_to_obs.py`` (low-dim observations, plus 84x84 camera images
   with ``images``) make the robomimic hdf5, kept next to the store as ``<out without .zarr>.hdf5``;
4. :func:`difftori.datasets.robomimic_hdf5.convert_robomimic` writes the episode store.

Rollouts (:func:`env_for_store`) rebuild the env from the file's ``env_args`` with robomimic's
``EnvUtils.create_env_from_metadata`` (:class:`RobomimicEnv`). ``reset(seed=s)`` reseeds the
robosuite env's generator (object placement, object sizes, robot init noise), so an attempt seed
reproduces the recorded initial state exactly. It then steps the freshly built model, as
robomimic's own rollouts do; the recorded episodes ran in the model reloaded from its xml
(``DataCollectionWrapper`` does that), whose dynamics differ slightly, so only a replay from
``reset(options={"model": model_file, "states": states[0]})`` reproduces the recorded states.

Step limits are robomimic's rollout horizons for its proficient-human datasets
(``robomimic/__init__.py``, ``register_all_links``: lift, can, square 400; transport, tool_hang 700).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display; before mujoco

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
from difftori.eval.suites import SUITES, Suite  # noqa: E402
from tqdm import tqdm  # noqa: E402

if TYPE_CHECKING:
    from difftori.datasets.episode_store import EpisodeStore, StoreMeta
    from difftori.eval.demos import DemoConfig

log = logging.getLogger(__name__)

ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}  # tasks with an expert
HORIZONS = {"lift": 400, "can": 400, "square": 400, "transport": 700, "tool_hang": 700}
ROBOT = "Panda"
# robosuite.make options of the recorded env (robomimic's datasets: Panda, 20 Hz, sparse reward).
RECORD_KWARGS: dict[str, Any] = {
    "robots": ROBOT,
    "has_renderer": False,
    "has_offscreen_renderer": False,
    "ignore_done": True,
    "use_camera_obs": False,
    "use_object_obs": True,
    "control_freq": 20,
    "reward_shaping": False,
}
RENDER_CAMERA = "agentview"
RENDER_SIZE = 256
_SCRIPTS = "robomimic.scripts"


@dataclass(frozen=True)
class RobomimicObsConfig:
    """What ``dataset_states_to_obs.py`` extracts: low-dim always; ``images``: camera images too."""

    images: bool = False
    image_size: int = 84
    cameras: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.images and not self.cameras:
            raise ValueError("images=True needs at least one camera in cameras")


def tasks() -> list[str]:
    """Tasks with a scripted expert (demos can be generated)."""
    return sorted(ENV_NAMES)


def max_episode_steps(task: str) -> int:
    """robomimic's rollout horizon for ``task`` (see the module docstring)."""
    if task not in HORIZONS:
        raise ValueError(f"unknown robomimic task {task!r}; known: {', '.join(sorted(HORIZONS))}")
    return HORIZONS[task]


def env_name(task: str) -> str:
    if task not in ENV_NAMES:
        raise ValueError(f"no robomimic expert for task {task!r}; valid tasks: {', '.join(tasks())}")
    return ENV_NAMES[task]


def hdf5_path(out: Path) -> Path:
    """Where the robomimic hdf5 of the store ``out`` is kept: ``<out without .zarr>.hdf5``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".zarr") + ".hdf5")


def _imports() -> None:
    from difftori.eval.suites import robomimic_compat

    robomimic_compat.apply()


def seed_robosuite(env: Any, seed: int) -> None:
    """Point every random draw of a reset (objects, placement samplers, robot noise) at one
    generator seeded with ``seed``; ``env`` is a robosuite env."""
    rng = np.random.default_rng(int(seed))
    env.rng = rng
    stack = [getattr(env, "placement_initializer", None)]
    while stack:
        sampler = stack.pop()
        if sampler is not None:
            sampler.rng = rng
            stack.extend(getattr(sampler, "samplers", {}).values())


def make_expert(task: str, env: Any) -> Any:
    """The scripted expert of ``task``; ``env`` (robosuite) gives the fixed goal (can's target bin,
    square's peg)."""
    from difftori.eval.suites import robomimic_experts as experts

    if task == "lift":
        return experts.lift_expert()
    if task == "can":
        return experts.can_expert(env.target_bin_placements[env.object_to_id["can"]])
    if task == "square":
        return experts.square_expert(np.array(env.sim.data.body_xpos[env.peg1_body_id]), env.table_offset[2])
    raise ValueError(f"no robomimic expert for task {task!r}; valid tasks: {', '.join(tasks())}")


# -- demos ---------------------------------------------------------------------------------------
def write_demos(cfg: DemoConfig, out: Path, overwrite: bool, resume: bool) -> EpisodeStore:
    """Record ``cfg.episodes`` expert demos as a robomimic hdf5 (kept at :func:`hdf5_path`) and
    convert it to the store ``out``. ``resume`` is not supported: a rerun records again."""
    from difftori.base_policies.configs import config_from_dict
    from difftori.datasets.robomimic_hdf5 import convert_robomimic

    obs = config_from_dict(RobomimicObsConfig, cfg.obs, f"demos.obs for suite {cfg.suite}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = hdf5_path(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.robomimic-") as tmp:
        demo, seeds = record_robosuite_demos(cfg, Path(tmp) / "raw")
        made = robomimic_dataset(demo, obs)
        os.replace(made, target)  # same folder: atomic
    log.info("%s: robomimic hdf5 with %d demos", target, len(seeds))
    params = {**asdict(cfg), "obs": asdict(obs)}
    attempts = cfg.attempt_seeds().index(seeds[-1]) + 1  # attempts run until the last kept one
    return convert_robomimic(
        target,
        out,
        task=cfg.task,
        suite="robomimic",
        seeds=seeds,
        zarr_format=cfg.zarr_format,
        overwrite=overwrite,
        params=params,
        attempts=attempts,
    )


def record_robosuite_demos(cfg: DemoConfig, folder: Path) -> tuple[Path, list[int]]:
    """Steps 1-2 of the module docstring: ``(<folder>/demo.hdf5, env seed of each demo)``."""
    _imports()
    import robosuite
    from robosuite.controllers import load_composite_controller_config
    from robosuite.scripts.collect_human_demonstrations import gather_demonstrations_as_hdf5
    from robosuite.wrappers import DataCollectionWrapper

    name = env_name(cfg.task)
    controller = load_composite_controller_config(robot=ROBOT)
    raw = folder / "episodes"
    with contextlib.redirect_stdout(io.StringIO()):  # robosuite prints per episode and folder
        env = DataCollectionWrapper(
            robosuite.make(name, controller_configs=controller, **RECORD_KWARGS), str(raw)
        )
    try:
        kept = _run_attempts(cfg, env)
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            env.close()  # flushes the last episode
    env_info = json.dumps({"robots": ROBOT, "controller_configs": controller, **_info_kwargs()})
    with contextlib.redirect_stdout(io.StringIO()):
        gather_demonstrations_as_hdf5(str(raw), str(folder), env_info)
    demo = folder / "demo.hdf5"
    _order_demos(demo, kept)
    return demo, [seed for seed, _ in kept]


def _info_kwargs() -> dict[str, Any]:
    return {k: v for k, v in RECORD_KWARGS.items() if k != "robots"}


class _RecordedEnv(gym.Env):
    """The recorded robosuite env (``DataCollectionWrapper``) behind the suite-env contract, so the
    expert runs through the evaluation runner: ``reset(seed=s)`` reseeds robosuite
    (:func:`seed_robosuite`), observations are robosuite's own (float64, as the expert reads them),
    success is the task's check, and episodes are truncated at ``max_episode_steps``.
    ``initial_states`` collects the simulator state after each reset (to match the gathered demos
    to their attempts)."""

    control_mode = "OSC_POSE"

    def __init__(self, recorder: Any, max_episode_steps: int) -> None:
        self.recorder, self.max_episode_steps = recorder, max_episode_steps
        self.initial_states: list[np.ndarray] = []
        low, high = recorder.env.action_spec
        self.action_space = gym.spaces.Box(np.float32(low), np.float32(high), dtype=np.float32)
        spec = {k: np.asarray(v) for k, v in recorder.env.observation_spec().items()}
        self.obs_kinds = {k: "lowdim" for k in spec}
        box = {k: gym.spaces.Box(-np.inf, np.inf, v.shape, np.float64) for k, v in spec.items()}
        self.observation_space = gym.spaces.Dict(box)
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        if seed is not None:
            seed_robosuite(self.recorder.env, seed)
        with contextlib.redirect_stdout(io.StringIO()):  # the recorder prints its episode folders
            obs = self.recorder.reset()
        self.initial_states.append(np.array(self.recorder.sim.get_state().flatten()))
        self._steps = 0
        return {k: np.asarray(v) for k, v in obs.items()}, {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict[str, Any]]:
        with contextlib.redirect_stdout(io.StringIO()):
            obs, reward, _, info = self.recorder.step(np.asarray(action, dtype=np.float64))
        self._steps += 1
        success = bool(self.recorder.env._check_success())
        truncated = self._steps >= self.max_episode_steps and not success
        obs = {k: np.asarray(v) for k, v in obs.items()}
        return obs, float(reward), success, truncated, {**info, "success": success}

    def render(self) -> np.ndarray:
        raise NotImplementedError("the recorded env has no renderer")


class _EpisodeExpert:
    """The task's scripted expert, rebuilt at each episode start (its goal comes from the env)."""

    def __init__(self, task: str, env: Any) -> None:
        self.task, self.env = task, env
        self.expert: Any = None

    def reset(self) -> None:
        self.expert = make_expert(self.task, self.env)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self.expert(obs)


def _run_attempts(cfg: DemoConfig, recorder: Any) -> list[tuple[int, np.ndarray]]:
    """Run the expert from each attempt seed, through the evaluation runner, until ``cfg.episodes``
    succeed: [(seed, initial state)]."""
    from difftori.eval.multistep import MultiStepWrapper
    from difftori.eval.rollout import ExpertPolicy, run_policy_episodes

    env = _RecordedEnv(recorder, cfg.max_episode_steps or max_episode_steps(cfg.task))
    low, high = env.action_space.low, env.action_space.high
    expert = ExpertPolicy(_EpisodeExpert(cfg.task, recorder.env), list(env.obs_kinds), low, high)
    envs, kept, tried = [MultiStepWrapper(env, n_obs_steps=1)], [], 0
    bar = tqdm(total=cfg.episodes, desc=f"demos {cfg.task}", unit="ep")
    for seed in cfg.attempt_seeds():
        if len(kept) >= cfg.episodes:
            break
        (record,) = run_policy_episodes(envs, expert, [(0, seed)])
        tried += 1
        if record.success:
            kept.append((seed, env.initial_states[-1]))
            bar.update(1)
        else:
            log.info("expert failed on seed %d after %d steps; not kept", seed, record.steps)
        bar.set_postfix(tried=tried)
    bar.close()
    if len(kept) < cfg.episodes:
        raise RuntimeError(
            f"the robomimic expert succeeded in only {len(kept)} of {tried} attempts on {cfg.task}; "
            f"{cfg.episodes} were asked (raise max_attempts or max_episode_steps)"
        )
    return kept


def _order_demos(demo: Path, kept: list[tuple[int, np.ndarray]]) -> None:
    """Rename ``data/demo_N`` so that N follows the attempt order (matched by initial state)."""
    with h5py.File(demo, "a") as f:
        names = list(f["data"].keys())
        if len(names) != len(kept):
            raise RuntimeError(
                f"{demo}: gather_demonstrations_as_hdf5 wrote {len(names)} demos, expected {len(kept)}"
            )
        order: dict[str, int] = {}
        for name in names:
            first = f[f"data/{name}/states"][0]
            hits = [i for i, (_, s) in enumerate(kept) if s.shape == first.shape and np.array_equal(s, first)]
            if len(hits) != 1:
                raise RuntimeError(
                    f"{demo}: data/{name}/states[0] matches {len(hits)} recorded episodes, expected 1"
                )
            order[name] = hits[0]
        for name in names:
            f.move(f"data/{name}", f"data/_{name}")
        for name, i in order.items():
            f.move(f"data/_{name}", f"data/demo_{i + 1}")


def robomimic_dataset(demo: Path, obs: RobomimicObsConfig) -> Path:
    """Step 3: run robomimic's conversion scripts on ``demo``; the path of the file they make."""
    from difftori.eval.suites.robomimic_compat import run_script

    run_script(f"{_SCRIPTS}.conversion.convert_robosuite", ["--dataset", str(demo)])
    name = "image.hdf5" if obs.images else "low_dim.hdf5"
    args = ["--dataset", str(demo), "--output_name", name, "--done_mode", "2"]
    if obs.images:
        size = str(obs.image_size)
        args += ["--camera_names", *obs.cameras, "--camera_height", size, "--camera_width", size]
    run_script(f"{_SCRIPTS}.dataset_states_to_obs", args)
    return demo.parent / name


# -- rollouts ------------------------------------------------------------------------------------
def env_for_store(meta: StoreMeta, max_episode_steps: int, keys: Sequence[str] | None = None) -> RobomimicEnv:
    """The env described by the store's ``params["env_args"]``, observing ``keys`` (None: all)."""
    env_args = meta.params.get("env_args")
    if not isinstance(env_args, dict) or "env_name" not in env_args:
        raise ValueError(
            f"store of task {meta.task!r}: params['env_args'] must be robomimic's env_args dict "
            f"(with env_name, type, env_kwargs), got {type(env_args).__name__}"
        )
    wanted = list(meta.obs_kinds) if keys is None else list(keys)
    unknown = sorted(set(wanted) - set(meta.obs_kinds))
    if unknown:
        raise ValueError(f"unknown observation keys {unknown}; the store has {sorted(meta.obs_kinds)}")
    kinds = {k: meta.obs_kinds[k] for k in wanted}
    return RobomimicEnv(env_args, kinds, max_episode_steps)


class RobomimicEnv(gym.Env):
    """robomimic's ``EnvRobosuite`` as a gymnasium env with the suite contract (module docstring).

    Observations: the keys of ``obs_kinds``; ``lowdim`` as float32 vectors, ``image`` as uint8 CHW
    (robomimic's HWC frames, already flipped upright as in its datasets, transposed).
    """

    metadata = {"render_modes": ["rgb_array"]}
    suite = "robomimic"

    def __init__(self, env_args: dict[str, Any], obs_kinds: dict[str, str], max_episode_steps: int) -> None:
        _imports()
        import robomimic.utils.env_utils as EnvUtils
        import robomimic.utils.obs_utils as ObsUtils

        self.env_args = env_args
        self.obs_kinds = dict(obs_kinds)
        self.max_episode_steps = max_episode_steps
        images = [k for k, v in obs_kinds.items() if v == "image"]
        lowdim = [k for k, v in obs_kinds.items() if v != "image"]
        ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": lowdim, "rgb": images}})
        with contextlib.redirect_stdout(io.StringIO()):
            self._env = EnvUtils.create_env_from_metadata(
                env_meta=env_args, render=False, render_offscreen=bool(images), use_image_obs=bool(images)
            )
        self._env.postprocess_visual_obs = False  # uint8 HWC, as dataset_states_to_obs stores them
        self.control_mode = _control_mode(env_args)
        low, high = self.sim_env.action_spec
        self.action_space = gym.spaces.Box(np.float32(low), np.float32(high), dtype=np.float32)
        first = self._observe(self._env.get_observation())
        missing = sorted(set(obs_kinds) - set(first))
        if missing:
            raise ValueError(
                f"{env_args['env_name']}: the env gives no observation {missing}; it has {sorted(first)}"
            )
        self.observation_space = gym.spaces.Dict({k: _space(v) for k, v in first.items()})
        self._steps = 0
        self._renderer: Any = None
        self._render_model: Any = None

    @property
    def sim_env(self) -> Any:
        """The robosuite env."""
        return self._env.env

    @property
    def robomimic_env(self) -> Any:
        """robomimic's ``EnvRobosuite`` (``reset_to``, ``get_state``, ``is_success``)."""
        return self._env

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``seed``: a fresh episode from that seed. ``options={"states": s, "model": xml}``: restore
        a recorded state instead (robomimic's ``reset_to``; with the demo's ``model_file`` an
        open-loop replay of its actions reproduces its states exactly)."""
        super().reset(seed=seed)
        if seed is not None:
            seed_robosuite(self.sim_env, seed)
        self._steps = 0
        if options and "states" in options:
            restore = {k: options[k] for k in ("model", "states") if k in options}
            return self._observe(self._env.reset_to(restore)), {"success": False}
        return self._observe(self._env.reset()), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), self.action_space.low, self.action_space.high)
        obs, reward, _, info = self._env.step(action)
        self._steps += 1
        success = bool(self._env.is_success()["task"])
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observe(obs), float(reward), success, truncated, {**info, "success": success}

    def render(self) -> np.ndarray:
        """RGB frame (H, W, 3) uint8 from the agentview camera, for videos."""
        import mujoco

        model = self.sim_env.sim.model._model  # a hard reset makes a new model: new renderer then
        if self._renderer is None or self._render_model is not model:
            self.close_renderer()
            self._renderer = mujoco.Renderer(model, RENDER_SIZE, RENDER_SIZE)
            self._render_model = model
        self._renderer.update_scene(self.sim_env.sim.data._data, camera=RENDER_CAMERA)
        return self._renderer.render()

    def close_renderer(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self._renderer = self._render_model = None

    def close(self) -> None:
        self.close_renderer()
        self.sim_env.close()

    def _observe(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for key, kind in self.obs_kinds.items():
            if key not in obs:
                continue
            value = np.asarray(obs[key])
            out[key] = (
                np.ascontiguousarray(value.transpose(2, 0, 1))
                if kind == "image"
                else value.astype(np.float32)
            )
        return out


def _space(value: np.ndarray) -> gym.spaces.Box:
    if value.dtype == np.uint8:
        return gym.spaces.Box(0, 255, value.shape, np.uint8)
    return gym.spaces.Box(-np.inf, np.inf, value.shape, np.float32)


def _control_mode(env_args: dict[str, Any]) -> str:
    from difftori.datasets.robomimic_hdf5 import control_mode

    return control_mode(env_args)


SUITES.register(
    Suite(
        name="robomimic",
        metric="failure",
        obs_config=RobomimicObsConfig,
        tasks=tasks,
        max_episode_steps=max_episode_steps,
        write_demos=write_demos,
        env_for_store=env_for_store,
        max_envs_per_worker=1,  # robosuite's OpenGL contexts do not share a process safely
    )
)
