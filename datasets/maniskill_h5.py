"""ManiSkill3 trajectory file (``<name>.h5`` + ``<name>.json``) -> difftori episode store.

What ManiSkill 3.0.1's ``RecordEpisode`` writes (its motion planners; ``replay_trajectory
--save-traj``)::

    <name>.json  env_info: env_id, env_kwargs (obs_mode, control_mode, sim_backend, sensor_configs,
                 ...), max_episode_steps; episodes: [{episode_id, episode_seed, reset_kwargs
                 {seed, options}, control_mode, elapsed_steps, success}, ...]
    <name>.h5    traj_<episode_id>/
                   actions                          (T, Da) float32
                   obs                              T + 1 steps; obs_mode "state": one dataset (T + 1, D);
                                                    "pointcloud": agent/*, extra/*, sensor_param/*,
                                                    pointcloud/{xyzw (N, 4), rgb (N, 3), segmentation (N, 1)}
                   env_states/...                   (T + 1, ...) (optional here)
                   success, terminated, truncated   (T,) bool

:class:`ManiSkillFile` opens and validates one (every mismatch is a :class:`ManiSkillFileError`
naming the file, the group and key). A store step pairs ``obs[t]`` with ``actions[t]`` (the final
observation has no action). :func:`observations` makes the store keys from ManiSkill observations,
for the converter and for the evaluation env alike: ``state`` (state mode), or ``point_cloud``
(N, 3 | 6) and ``agent_pos`` (point-cloud mode; ``agent/*`` then ``extra/*``, each group's keys in
sorted order, flattened, as ManiSkill's own baselines concatenate them). The point cloud keeps the
valid points (``w > 0``), drops the background (segmentation 0) and the actors of
:attr:`ManiSkillObsConfig.exclude`, optionally moves them to the end-effector (TCP) frame, and
farthest-point samples ``n_points`` of them.

Which segmentation ids the excluded actors have, and the action bounds, only the simulator knows:
the caller passes them as :class:`EnvFacts` (the maniskill suite builds the env to get them), so
this module stays free of the simulator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore, EpisodeWriter, StoreError, StoreMeta
from difftori.datasets.pointcloud import farthest_point_sample
from difftori.datasets.safeio import OutputLock
from tqdm import tqdm

log = logging.getLogger(__name__)

OBS_MODES = ("state", "pointcloud")
FRAMES = ("world", "tcp")
_TRAJ = re.compile(r"traj_(\d+)")
_CLOUD_KEYS = {"xyzw": 4, "rgb": 3, "segmentation": 1}


class ManiSkillFileError(StoreError):
    """A ManiSkill trajectory file does not hold what ManiSkill writes; names file, group and key."""


@dataclass(frozen=True)
class ManiSkillObsConfig:
    """How ManiSkill demos are replayed and observed (params ``demos.obs`` of the maniskill suite).

    ``obs_mode``: ``pointcloud`` or ``state``; ``control_mode``: the controller the demos' actions
    are converted to (``replay_trajectory -c``); ``n_points``: points kept by farthest-point
    sampling; ``rgb``: xyz + rgb / 255, (N, 6); ``frame``: ``world`` or ``tcp`` (the end effector's
    frame, as in the paper's ManiSkill runs); ``exclude``: actors whose points are removed besides
    the background; ``camera_size``: sensor width = height when demos are replayed (ManiSkill's
    default 128; a converted file keeps its own).
    """

    obs_mode: str = "pointcloud"
    control_mode: str = "pd_ee_delta_pose"
    n_points: int = 512
    rgb: bool = False
    frame: str = "world"
    exclude: tuple[str, ...] = ("ground",)
    camera_size: int = 128

    def __post_init__(self) -> None:
        if self.obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {self.obs_mode!r}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        if self.n_points < 1 or self.camera_size < 8:
            raise ValueError(f"need n_points >= 1, camera_size >= 8; got {self.n_points}, {self.camera_size}")

    @property
    def obs_kinds(self) -> dict[str, str]:
        if self.obs_mode == "state":
            return {"state": "lowdim"}
        return {"point_cloud": "point_cloud", "agent_pos": "lowdim"}


@dataclass(frozen=True)
class EnvFacts:
    """What only the simulator knows about a file's env: its action bounds and the segmentation ids
    of its actors by name."""

    action_low: list[float]
    action_high: list[float]
    actor_ids: dict[str, list[int]]

    def drop_ids(self, exclude: Sequence[str], where: str) -> list[int]:
        unknown = sorted(set(exclude) - set(self.actor_ids))
        if unknown:
            raise ValueError(f"{where}: exclude: no actors {unknown}; the env has {sorted(self.actor_ids)}")
        return sorted(i for name in exclude for i in self.actor_ids[name])


# -- observations -----------------------------------------------------------------------------------
def observations(obs: Any, cfg: ManiSkillObsConfig, drop_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Store keys from ManiSkill observations with a leading step axis (a trajectory's ``obs`` read
    as nested dicts of arrays, or an env's batched observation as numpy); see the module docstring."""
    if cfg.obs_mode == "state":
        return {"state": np.asarray(obs, dtype=np.float32)}
    parts = [_flat(obs[group][k]) for group in ("agent", "extra") for k in sorted(obs.get(group, {}))]
    cloud = obs["pointcloud"]
    xyzw = np.asarray(cloud["xyzw"])
    seg = np.asarray(cloud["segmentation"])[..., 0]
    keep = (xyzw[..., 3] > 0) & (seg != 0) & ~np.isin(seg, np.asarray(drop_ids, dtype=seg.dtype))
    rgb = np.asarray(cloud["rgb"]) if cfg.rgb else None
    tcp = np.asarray(obs["extra"]["tcp_pose"]) if cfg.frame == "tcp" else None
    clouds = []
    for t in range(len(xyzw)):
        points = xyzw[t, keep[t], :3].astype(np.float64)
        if tcp is not None:
            points = to_pose_frame(points, tcp[t])
        if rgb is not None:
            points = np.concatenate([points, rgb[t, keep[t]] / 255.0], axis=1)
        clouds.append(farthest_point_sample(points, cfg.n_points))
    return {"point_cloud": np.stack(clouds), "agent_pos": np.concatenate(parts, axis=1).astype(np.float32)}


def _flat(value: Any) -> np.ndarray:
    value = np.asarray(value)
    return value.reshape(len(value), -1).astype(np.float64)


def to_pose_frame(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points (N, 3) in the frame of ``pose`` = (x, y, z, qw, qx, qy, qz), ManiSkill's layout."""
    w, x, y, z = np.asarray(pose[3:7], dtype=np.float64) / np.linalg.norm(pose[3:7])
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    return (points - np.asarray(pose[:3], dtype=np.float64)) @ rot


# -- the file ---------------------------------------------------------------------------------------
class ManiSkillFile:
    """An open, validated ManiSkill trajectory file (a context manager).

    Opening checks (without reading observations): the json beside the h5 has ``env_info`` with
    ``env_id`` and ``env_kwargs`` (an ``obs_mode`` of :data:`OBS_MODES`) and a list of
    ``episodes`` with ``episode_id`` and ``reset_kwargs``; the h5 holds only ``traj_<i>`` groups,
    one per json episode; each has ``actions`` (T, Da) with the same Da, ``success``,
    ``terminated``, ``truncated`` of T steps, observations of T + 1 steps in the layout of the
    obs mode, and (if present) ``env_states`` of T + 1 steps; actions are finite.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.json_path = self.path.with_suffix(".json")
        self.env_info, self.json_episodes = self._read_json()
        self.obs_mode = self.env_info["env_kwargs"]["obs_mode"]
        self.control_mode = str(self.env_info["env_kwargs"].get("control_mode", "pd_joint_pos"))
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:  # missing, not hdf5, truncated
            raise ManiSkillFileError(f"{self.path}: /: cannot open as hdf5 ({e})") from None
        try:
            with self._reading("/"):
                self._validate()
        except BaseException:
            self._f.close()
            raise

    def _err(self, where: str, what: str) -> ManiSkillFileError:
        return ManiSkillFileError(f"{self.path}: {where}: {what}")

    @contextlib.contextmanager
    def _reading(self, where: str) -> Iterator[None]:
        """An hdf5 read error (a corrupt block) as a :class:`ManiSkillFileError` naming ``where``."""
        try:
            yield
        except OSError as e:
            raise self._err(where, f"unreadable ({e})") from None

    def _read_json(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        where = self.json_path
        try:
            data = json.loads(where.read_text())
        except FileNotFoundError:
            raise ManiSkillFileError(
                f"{where}: missing: ManiSkill keeps env_info and the episodes' reset_kwargs in the json "
                f"beside {self.path.name}"
            ) from None
        except ValueError as e:
            raise ManiSkillFileError(f"{where}: not valid json ({e})") from None
        info = data.get("env_info") if isinstance(data, dict) else None
        if not (
            isinstance(info, dict)
            and isinstance(info.get("env_id"), str)
            and isinstance(info.get("env_kwargs"), dict)
        ):
            raise ManiSkillFileError(f"{where}: env_info: expected an object with env_id (str), env_kwargs")
        mode = info["env_kwargs"].get("obs_mode")
        if mode not in OBS_MODES:
            raise ManiSkillFileError(
                f"{where}: env_info.env_kwargs.obs_mode: {mode!r}, expected one of {OBS_MODES} (replay "
                "the file with observations first: python -m mani_skill.trajectory.replay_trajectory "
                "--traj-path FILE -o pointcloud --save-traj)"
            )
        episodes = data.get("episodes")
        if not isinstance(episodes, list) or not episodes:
            raise ManiSkillFileError(f"{where}: episodes: expected a non-empty list")
        for i, ep in enumerate(episodes):
            ok = isinstance(ep, dict) and type(ep.get("episode_id")) is int
            if not ok or not isinstance(ep.get("reset_kwargs"), dict):
                raise ManiSkillFileError(
                    f"{where}: episodes[{i}]: expected an object with episode_id (int) and reset_kwargs"
                )
        return info, episodes

    def _validate(self) -> None:
        for name in self._f:
            if _TRAJ.fullmatch(name) is None or not isinstance(self._f[name], h5py.Group):
                raise self._err(name, "unexpected entry: the file holds only groups traj_<i>")
        self.action_dim: int | None = None
        self.lengths = {ep["episode_id"]: self._check_traj(ep["episode_id"]) for ep in self.json_episodes}

    def _check_traj(self, episode_id: int) -> int:
        name = f"traj_{episode_id}"
        g = self._f.get(name)
        if not isinstance(g, h5py.Group):
            raise self._err(name, f"missing: {self.json_path.name} lists episode_id {episode_id}")
        act = g.get("actions")
        if not isinstance(act, h5py.Dataset) or act.ndim != 2 or act.shape[0] < 1:
            got = getattr(act, "shape", "missing")
            raise self._err(f"{name}/actions", f"expected a (T, action dim) dataset with T >= 1, got {got}")
        n, dim = act.shape
        if self.action_dim is not None and dim != self.action_dim:
            raise self._err(f"{name}/actions", f"{dim} action dims, but the first has {self.action_dim}")
        self.action_dim = dim
        bad = ~np.isfinite(act[()]).all(axis=1)
        if bad.any():
            raise self._err(f"{name}/actions", f"NaN or inf at step {int(np.argmax(bad))}")
        for key in ("success", "terminated", "truncated"):
            ds = g.get(key)
            if not isinstance(ds, h5py.Dataset) or ds.shape != (n,):
                got = getattr(ds, "shape", "missing")
                raise self._err(f"{name}/{key}", f"expected ({n},) flags (one per action), got {got}")
        self._check_steps(g, "obs", n + 1, required=True)
        if "env_states" in g:
            self._check_steps(g, "env_states", n + 1, required=False)
        return n

    def _check_steps(self, g: h5py.Group, key: str, steps: int, required: bool) -> None:
        """Every dataset under ``g[key]`` has ``steps`` steps (observations: in the obs mode's layout)."""
        where = f"{g.name.lstrip('/')}/{key}"
        node = g.get(key)
        if node is None:
            raise self._err(where, "missing (observations of T + 1 steps)")
        if required and self.obs_mode == "state":
            if not isinstance(node, h5py.Dataset) or node.ndim != 2:
                raise self._err(where, f"expected a (T + 1, D) state dataset (obs_mode state), got {node}")
        elif required:
            self._check_cloud(node, where)
        datasets: list[tuple[str, h5py.Dataset]] = []
        if isinstance(node, h5py.Dataset):
            datasets.append((where, node))
        else:
            node.visititems(lambda k, v: datasets.append((f"{where}/{k}", v)) if _is_dataset(v) else None)
        for path, ds in datasets:
            if ds.shape[:1] != (steps,):
                got = ds.shape[0] if ds.ndim else 0
                raise self._err(path, f"{got} steps, expected {steps} (one more than actions)")

    def _check_cloud(self, obs: Any, where: str) -> None:
        if not isinstance(obs, h5py.Group) or not isinstance(obs.get("pointcloud"), h5py.Group):
            raise self._err(where, "expected a group with pointcloud/ (obs_mode pointcloud)")
        for group in ("agent", "extra"):
            if not isinstance(obs.get(group), h5py.Group):
                raise self._err(f"{where}/{group}", "missing: the agent state (agent_pos) is made from it")
        for key, width in _CLOUD_KEYS.items():
            ds = obs["pointcloud"].get(key)
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3 or ds.shape[2] != width:
                got = getattr(ds, "shape", "missing")
                raise self._err(f"{where}/pointcloud/{key}", f"expected (T + 1, N, {width}), got {got}")

    # -- reading ------------------------------------------------------------------------------------
    def kept_episodes(self, successful_only: bool = True) -> list[dict[str, Any]]:
        """The json episodes to convert: those ManiSkill reports as successful (its ``success``,
        else the trajectory's last ``success`` flag), or all."""
        kept = []
        for ep in self.json_episodes:
            ok = ep.get("success")
            if ok is None:
                ok = bool(self._f[f"traj_{ep['episode_id']}/success"][-1])
            if ok or not successful_only:
                kept.append(ep)
        return kept

    def episode(
        self, episode_id: int, cfg: ManiSkillObsConfig, drop_ids: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """One trajectory as store steps: :func:`observations` of ``obs[:-1]`` and ``action``."""
        name = f"traj_{episode_id}"
        with self._reading(f"{name}/obs"):
            obs = _read(self._f[f"{name}/obs"])
        steps = observations(obs, cfg, drop_ids)
        steps = {k: v[:-1] for k, v in steps.items()}
        for key, value in steps.items():
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            if bad.any():
                raise self._err(f"{name}/obs", f"{key}: NaN or inf at step {int(np.argmax(bad))}")
        with self._reading(f"{name}/actions"):
            steps[ACTION_KEY] = np.asarray(self._f[f"{name}/actions"][()], dtype=np.float32)
        return steps

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ManiSkillFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_dataset(node: Any) -> bool:
    return isinstance(node, h5py.Dataset)


def _read(node: Any) -> Any:
    """An h5 group as nested dicts of numpy arrays (a dataset as its array)."""
    if isinstance(node, h5py.Dataset):
        return node[()]
    return {k: _read(v) for k, v in node.items() if k != "sensor_param"}


def convert_maniskill(
    src: str | Path,
    out: str | Path,
    facts: Callable[[dict[str, Any]], EnvFacts],
    *,
    task: str,
    obs: ManiSkillObsConfig | None = None,
    suite: str = "maniskill",
    max_episodes: int = 0,
    zarr_format: int = 2,
    overwrite: bool = False,
    wait: bool = False,
    params: Mapping[str, Any] | None = None,
    attempts: int | None = None,
    progress: bool = True,
) -> EpisodeStore:
    """Convert the ManiSkill trajectory ``src`` (h5, json beside it) into the store ``out`` atomically.

    The episodes ManiSkill reports as successful, in the json's order (the first ``max_episodes``
    of them; 0: all), each with its ``episode_seed`` as the store's seed. ``obs`` sets the point
    cloud (its ``obs_mode``, ``control_mode`` and, if the file sets it, ``camera_size`` are taken
    from the file). The metadata records
    ``env_info``, each episode's ``reset_kwargs``, ``obs``, the excluded segmentation ids
    (``drop_ids``) and ``source_file``, so that evaluation rebuilds the same env; ``params`` (e.g.
    the generating config) is recorded beside them. ``facts(env_info)`` gives the env's
    :class:`EnvFacts` (called once the file is validated). Raises :class:`ManiSkillFileError` naming the
    file, group and key; nothing is left behind then.
    """
    src, out = Path(src), Path(out)
    with OutputLock(out, wait):
        EpisodeWriter.check_target(out, overwrite)
        with ManiSkillFile(src) as f:
            cfg = replace(obs or ManiSkillObsConfig(), obs_mode=f.obs_mode, control_mode=f.control_mode)
            sensors = f.env_info["env_kwargs"].get("sensor_configs") or {}
            cfg = replace(cfg, camera_size=int(sensors.get("width", cfg.camera_size)))
            env = facts(f.env_info)
            drop = env.drop_ids(cfg.exclude, str(src)) if cfg.obs_mode == "pointcloud" else []
            episodes = f.kept_episodes()
            episodes = episodes[:max_episodes] if max_episodes else episodes
            if not episodes:
                raise ManiSkillFileError(f"{src}: no successful episode to convert (json 'success')")
            meta = _store_meta(f, task, suite, cfg, env, drop, episodes, params)
            writer = EpisodeStore.create(out, meta, zarr_format=zarr_format, overwrite=overwrite)
            try:
                bar = tqdm(episodes, desc=f"convert {src.name}", unit="traj", disable=not progress)
                for ep in bar:
                    writer.add_episode(f.episode(ep["episode_id"], cfg, drop), _seed(ep))
                if attempts is not None:
                    writer.meta.n_attempts = max(attempts, writer.n_episodes)
                return writer.commit()
            except BaseException:
                writer.discard()  # a conversion is rerun, never resumed
                raise


def _seed(episode: dict[str, Any]) -> int:
    seed = episode.get("episode_seed", episode["reset_kwargs"].get("seed", episode["episode_id"]))
    return int(seed[0] if isinstance(seed, list) else seed)


def _store_meta(
    f: ManiSkillFile,
    task: str,
    suite: str,
    cfg: ManiSkillObsConfig,
    facts: EnvFacts,
    drop: list[int],
    episodes: list[dict[str, Any]],
    params: Mapping[str, Any] | None,
) -> StoreMeta:
    if len(facts.action_low) != f.action_dim:
        raise ManiSkillFileError(
            f"{f.path}: traj_*/actions: {f.action_dim} dims, but {f.env_info['env_id']} under "
            f"{f.control_mode} takes {len(facts.action_low)}"
        )
    ours = {
        "env_info": f.env_info,
        "reset_kwargs": [ep["reset_kwargs"] for ep in episodes],
        "obs": asdict(cfg),
        "drop_ids": drop,
        "source_file": str(f.path),
    }
    return StoreMeta(
        task=task,
        suite=suite,
        source=f"maniskill-h5:{f.path.name}",
        obs_kinds=cfg.obs_kinds,
        action_low=list(facts.action_low),
        action_high=list(facts.action_high),
        control_mode=f.control_mode,
        params={**(params or {}), **ours},
    )
