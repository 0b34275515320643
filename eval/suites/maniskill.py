"""The maniskill suite: ManiSkill3 tasks on the CPU simulation backend (metric: success rate).

ManiSkill 3.0.1 (sapien 3.0.3) needs a Vulkan device even for state observations. On machines
without one, ``scripts/install.sh`` extracts Mesa 25's lavapipe (a CPU Vulkan driver; Debian
bookworm's Mesa 22 is refused) into ``<venv>/vulkan/``; :func:`use_private_vulkan` points
``VK_ICD_FILENAMES`` at it unless a Vulkan driver is already configured.

Demos (:func:`write_demos`) are made ManiSkill's way, with its own tools run unmodified in
subprocesses:

1. ManiSkill's motion-planning solutions (``mani_skill.examples.motionplanning.panda.run``) plan
   ``episodes`` + 10% spare demos in ``pd_joint_pos`` from consecutive seeds starting at the first
   attempt seed, keeping only the plans ManiSkill reports as successful (``--only-count-success``);
2. ``mani_skill.trajectory.replay_trajectory`` converts them to ``demos.obs.control_mode``
   (``pd_ee_delta_pose``, the paper's: end-effector delta position and rotation + gripper,
   normalised to [-1, 1]; ``pd_ee_delta_pos`` drops the rotation) with ``demos.obs.obs_mode``
   observations (sensors of ``camera_size``), keeping only the replays that succeed;
3. :func:`difftori.datasets.maniskill_h5.convert_maniskill` writes the first ``episodes`` of them.

The planner's own trajectory (``pd_joint_pos``, no observations; kilobytes) is kept beside the
store as ``<task>.motionplanning.h5`` + ``.json``; the replayed one (about 30 MB per demo with
point clouds) is not.

Rollouts (:func:`env_for_store`) rebuild the env from the store's ``env_info`` on the CPU backend
(:class:`ManiSkillEnv`) and observe it through the converter's own
:func:`~difftori.datasets.maniskill_h5.observations`. ``reset(seed=s)`` is ManiSkill's seeded
reset. Step limits: ManiSkill registers 50 steps for these tasks (tuned for RL policies); its own
imitation baselines evaluate policies trained on motion-planning demos (70-120 steps) with 100
(``examples/baselines/diffusion_policy/examples.sh``), which :data:`STEP_LIMITS` follows.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from difftori.datasets.maniskill_h5 import EnvFacts, ManiSkillObsConfig, observations
from difftori.eval.suites import SUITES, Suite

if TYPE_CHECKING:
    from difftori.datasets.episode_store import EpisodeStore, StoreMeta
    from difftori.eval.demos import DemoConfig

log = logging.getLogger(__name__)

ENV_IDS = {  # tasks with a ManiSkill motion-planning solution that succeeds >= 9/10 here
    "pick-cube": "PickCube-v1",
    "stack-cube": "StackCube-v1",
    "push-cube": "PushCube-v1",
    "pull-cube": "PullCube-v1",
}
STEP_LIMITS = dict.fromkeys(ENV_IDS, 100)  # ManiSkill's imitation baselines (module docstring)
SIM_BACKEND = "physx_cpu"
_ICD_DIRS = ("/etc/vulkan/icd.d", "/usr/share/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
_PLAN = (
    "import sys; start = int(sys.argv.pop()); "
    "from mani_skill.examples.motionplanning.panda import run; "
    "print(run._main(run.parse_args(), 0, start))"
)


def tasks() -> list[str]:
    """Tasks whose demos ManiSkill's motion planners can make."""
    return sorted(ENV_IDS)


def max_episode_steps(task: str) -> int:
    if task not in STEP_LIMITS:
        raise ValueError(f"unknown maniskill task {task!r}; known: {', '.join(tasks())}")
    return STEP_LIMITS[task]


def env_id(task: str) -> str:
    if task not in ENV_IDS:
        raise ValueError(f"no maniskill motion planner for task {task!r}; valid tasks: {', '.join(tasks())}")
    return ENV_IDS[task]


def task_for(env_id: str) -> str | None:
    """The difftori task of a ManiSkill env id (None if it has none)."""
    return {v: k for k, v in ENV_IDS.items()}.get(env_id)


def use_private_vulkan() -> None:
    """Point ``VK_ICD_FILENAMES`` at the install's lavapipe (``<venv>/vulkan/lvp_icd.json``) unless
    Vulkan is configured already (the variable is set, or the system has a non-lavapipe driver)."""
    if os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES"):
        return
    system = [p for d in _ICD_DIRS for p in Path(d).glob("*.json") if "lvp" not in p.name]
    icd = Path(sys.prefix) / "vulkan" / "lvp_icd.json"
    if not system and icd.is_file():
        os.environ["VK_ICD_FILENAMES"] = str(icd)


def _make(env_info: dict[str, Any], **overrides: Any) -> gym.Env:
    """``gym.make`` of a file's ``env_info`` on the CPU backend, one env, with ``overrides``."""
    use_private_vulkan()
    import mani_skill.envs  # noqa: F401  (registers the envs)

    kwargs = {**env_info["env_kwargs"], "sim_backend": SIM_BACKEND, "num_envs": 1, **overrides}
    return gym.make(env_info["env_id"], **kwargs)


def env_facts(env_info: dict[str, Any]) -> EnvFacts:
    """Action bounds and actor segmentation ids of the env a trajectory file describes."""
    env = _make(env_info, obs_mode="none")
    try:
        return _facts(env)
    finally:
        env.close()


def _facts(env: gym.Env) -> EnvFacts:
    ids: dict[str, list[int]] = {}
    for i, actor in env.unwrapped.segmentation_id_map.items():
        ids.setdefault(actor.name, []).append(int(i))
    space = env.action_space
    return EnvFacts([float(x) for x in space.low], [float(x) for x in space.high], ids)


# -- demos ---------------------------------------------------------------------------------------
def motionplanning_path(out: Path) -> Path:
    """Where the planner's trajectory of the store ``out`` is kept (its json beside it)."""
    return out.with_name(out.name.removesuffix(".zarr") + ".motionplanning.h5")


def write_demos(cfg: DemoConfig, out: Path, overwrite: bool, resume: bool) -> EpisodeStore:
    """Plan, replay and convert ``cfg.episodes`` demos (module docstring). ``resume`` is not
    supported: a rerun plans again (seconds per demo)."""
    from difftori.base_policies.configs import config_from_dict
    from difftori.datasets.maniskill_h5 import convert_maniskill

    obs = config_from_dict(ManiSkillObsConfig, cfg.obs, f"demos.obs for suite {cfg.suite}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = cfg.attempt_seeds()[0]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.maniskill-") as tmp:
        planned = plan_demos(env_id(cfg.task), cfg.episodes + max(1, cfg.episodes // 10), start, Path(tmp))
        replayed = replay_demos(planned, obs)
        kept = [e for e in json.loads(replayed.with_suffix(".json").read_text())["episodes"] if e["success"]]
        attempts = kept[cfg.episodes - 1]["episode_seed"] - start + 1 if len(kept) >= cfg.episodes else 0
        if not attempts:
            raise RuntimeError(
                f"{out}: ManiSkill's motion planner and replay kept only {len(kept)} demos of "
                f"{cfg.task}; {cfg.episodes} were asked"
            )
        store = convert_maniskill(
            replayed,
            out,
            env_facts,
            task=cfg.task,
            obs=obs,
            max_episodes=cfg.episodes,
            zarr_format=cfg.zarr_format,
            overwrite=overwrite,
            params={**asdict(cfg), "obs": asdict(obs), "start_seed": start},
            attempts=attempts,
        )
        keep = motionplanning_path(out)
        for src, dst in ((planned, keep), (planned.with_suffix(".json"), keep.with_suffix(".json"))):
            os.replace(src, dst)
    return store


def plan_demos(env: str, n: int, start_seed: int, folder: Path) -> Path:
    """ManiSkill's motion planner: ``n`` successful ``pd_joint_pos`` demos of ``env`` from seeds
    ``start_seed``, ``start_seed + 1``, ...; the h5 it writes."""
    args = ["-e", env, "-n", str(n), "--only-count-success", "-b", "cpu"]
    args += ["--record-dir", str(folder), "--traj-name", "trajectory", str(start_seed)]
    _run_maniskill([sys.executable, "-c", _PLAN, *args], f"motion planning {env}")
    return folder / env / "motionplanning" / "trajectory.h5"


def replay_demos(planned: Path, obs: ManiSkillObsConfig) -> Path:
    """ManiSkill's ``replay_trajectory``: ``planned`` in ``obs.control_mode`` with ``obs.obs_mode``
    observations, sensors of ``obs.camera_size`` (set in the json's ``env_kwargs`` first); the h5
    it writes beside ``planned``."""
    meta_path = planned.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    kwargs = meta["env_info"]["env_kwargs"]
    size = {"width": obs.camera_size, "height": obs.camera_size}
    kwargs["sensor_configs"] = {**kwargs.get("sensor_configs", {}), **size}
    meta_path.write_text(json.dumps(meta, indent=2))
    args = ["--traj-path", str(planned), "-o", obs.obs_mode, "-c", obs.control_mode, "-b", SIM_BACKEND]
    cmd = [sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", *args, "--save-traj"]
    _run_maniskill(cmd, f"replaying {planned.name}")
    made = planned.with_name(f"trajectory.{obs.obs_mode}.{obs.control_mode}.{SIM_BACKEND}.h5")
    if not made.is_file():
        raise RuntimeError(f"replay_trajectory wrote no {made.name} in {planned.parent}")
    return made


def _run_maniskill(cmd: list[str], what: str) -> None:
    """Run a ManiSkill tool (its progress bars on stderr); a failure raises with its output's tail."""
    use_private_vulkan()
    log.info("%s: %s", what, " ".join(cmd[3:] if cmd[1] == "-c" else cmd[1:]))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")


def convert_trajectory(src: Path, out: Path, task: str | None = None, **kwargs: Any) -> EpisodeStore:
    """``difftori convert maniskill``: a user's ManiSkill trajectory file (h5 + json) as a store;
    ``task`` defaults to the one of its env id; ``kwargs`` go to ``convert_maniskill``."""
    from difftori.datasets.maniskill_h5 import ManiSkillFile, ManiSkillFileError, convert_maniskill

    if task is None:
        with ManiSkillFile(src) as f:
            task = task_for(f.env_info["env_id"])
        if task is None:
            raise ManiSkillFileError(
                f"{src.with_suffix('.json')}: env_info.env_id {f.env_info['env_id']!r} has no difftori "
                f"task (known: {', '.join(f'{v}->{k}' for k, v in ENV_IDS.items())}); pass the task (--task)"
            )
    return convert_maniskill(src, out, env_facts, task=task, **kwargs)


# -- rollouts ------------------------------------------------------------------------------------
def env_for_store(meta: StoreMeta, max_episode_steps: int, keys: Sequence[str] | None = None) -> ManiSkillEnv:
    """The env of the store's ``env_info`` (CPU backend), observing ``keys`` (None: all)."""
    from difftori.base_policies.configs import config_from_dict

    info = meta.params.get("env_info")
    if not isinstance(info, dict) or "env_id" not in info or "env_kwargs" not in info:
        raise ValueError(
            f"store of task {meta.task!r}: params['env_info'] must be ManiSkill's env_info "
            f"(env_id, env_kwargs), got {type(info).__name__}"
        )
    cfg = config_from_dict(ManiSkillObsConfig, meta.params.get("obs"), f"store of task {meta.task!r}: obs")
    wanted = list(meta.obs_kinds) if keys is None else list(keys)
    unknown = sorted(set(wanted) - set(meta.obs_kinds))
    if unknown:
        raise ValueError(f"unknown observation keys {unknown}; the store has {sorted(meta.obs_kinds)}")
    return ManiSkillEnv(info, cfg, list(meta.params.get("drop_ids", [])), max_episode_steps, wanted)


class ManiSkillEnv(gym.Env):
    """A ManiSkill env (CPU backend, one env) behind the suite contract (see the suite package).

    Observations are :func:`~difftori.datasets.maniskill_h5.observations` of ManiSkill's, for the
    ``keys`` asked; success is ManiSkill's ``info["success"]``; an episode terminates at success
    (or ManiSkill's ``fail``) and is truncated at ``max_episode_steps``.
    """

    metadata = {"render_modes": ["rgb_array"]}
    suite = "maniskill"

    def __init__(
        self,
        env_info: dict[str, Any],
        cfg: ManiSkillObsConfig,
        drop_ids: list[int],
        max_episode_steps: int,
        keys: Sequence[str],
    ) -> None:
        cfg = replace(cfg, obs_mode=env_info["env_kwargs"].get("obs_mode", cfg.obs_mode))
        self._env = _make(env_info, render_mode="rgb_array", max_episode_steps=max_episode_steps)
        self.env_info, self.cfg, self.drop_ids = env_info, cfg, drop_ids
        self.max_episode_steps = max_episode_steps
        self.obs_kinds = {k: cfg.obs_kinds[k] for k in keys}
        self.control_mode = str(env_info["env_kwargs"].get("control_mode"))
        facts = _facts(self._env)
        ids = sorted(i for n in cfg.exclude for i in facts.actor_ids.get(n, []))
        if cfg.obs_mode == "pointcloud" and ids != sorted(drop_ids):
            raise ValueError(
                f"{env_info['env_id']}: actors {list(cfg.exclude)} have segmentation ids {ids} here, "
                f"but the store was converted with {sorted(drop_ids)}"
            )
        self.action_space = gym.spaces.Box(
            np.float32(facts.action_low), np.float32(facts.action_high), dtype=np.float32
        )
        first, _ = self.reset(seed=0)
        self.observation_space = gym.spaces.Dict(
            {k: gym.spaces.Box(-np.inf, np.inf, v.shape, np.float32) for k, v in first.items()}
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """ManiSkill's reset: ``seed`` (and ``options``, a stored episode's ``reset_kwargs``)."""
        super().reset(seed=seed)
        obs, _ = self._env.reset(seed=seed, options=options)
        self._steps = 0
        return self._observe(obs), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float32), self.action_space.low, self.action_space.high)
        obs, reward, _, _, info = self._env.step(action)
        self._steps += 1
        success = bool(_numpy(info["success"]).item())
        failed = bool(_numpy(info.get("fail", False)).item())
        truncated = self._steps >= self.max_episode_steps and not success
        reward = float(_numpy(reward).item())
        return self._observe(obs), reward, success or failed, truncated, {"success": success}

    def render(self) -> np.ndarray:
        """RGB frame (H, W, 3) uint8 of ManiSkill's human-render camera, for videos."""
        return np.ascontiguousarray(_numpy(self._env.render())[0]).astype(np.uint8)

    def close(self) -> None:
        self._env.close()

    def _observe(self, obs: Any) -> dict[str, np.ndarray]:
        out = observations(_numpy(obs), self.cfg, self.drop_ids)
        return {k: out[k][0] for k in self.obs_kinds}


def _numpy(value: Any) -> Any:
    """Torch tensors (ManiSkill's batched observations and infos), nested in dicts, as numpy."""
    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


SUITES.register(
    Suite(
        name="maniskill",
        metric="success",
        obs_config=ManiSkillObsConfig,
        tasks=tasks,
        max_episode_steps=max_episode_steps,
        write_demos=write_demos,
        env_for_store=env_for_store,
        max_envs_per_worker=1,  # one sapien scene and renderer per worker process
    )
)
