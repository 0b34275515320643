"""robomimic hdf5 -> difftori episode store (:func:`convert_robomimic`).

A robomimic file (what robomimic's ``convert_robosuite.py``, ``dataset_states_to_obs.py`` and
``split_train_val.py`` write) holds::

    data/                .attrs: env_args (json string), total (sum of num_samples)
      demo_<N>/          .attrs: num_samples, model_file; numbered in any range (robosuite: from 1)
        actions          (T, D) delta actions in [-1, 1]; optionally actions_abs (absolute poses)
        obs/<key>        (T, ...) low-dim float32/float64 vectors or uint8 HWC images
        next_obs/<key>   (T, ...) optional, same shapes as obs/<key>
        states, rewards, dones
    mask/<filter>        byte strings of demo names (b"demo_1"), e.g. train and valid

:class:`RobomimicFile` opens and validates one (every mismatch is a :class:`RobomimicFileError`
naming the file, the hdf5 group and key, and what was expected) and yields its demos in natural
order (demo_2 before demo_10) as store episodes: low-dim obs as float32, images as uint8 CHW, the
chosen action key as ``action`` (float32). Masks become the store's ``splits`` (episode indices).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore, EpisodeWriter, StoreError, StoreMeta
from difftori.datasets.safeio import OutputLock
from tqdm import tqdm

log = logging.getLogger(__name__)

ACTION_KEYS = ("actions", "actions_abs")
TASKS = {  # robosuite env_name -> difftori task
    "Lift": "lift",
    "PickPlaceCan": "can",
    "NutAssemblySquare": "square",
    "TwoArmTransport": "transport",
    "ToolHang": "tool_hang",
}
DELTA_RANGE = 1.0  # robosuite's default controller input range: delta actions lie in [-1, 1]
_DEMO = re.compile(r"demo_(\d+)")
_CAMERA_OPTIONS = ("use_camera_obs", "camera_names", "camera_heights", "camera_widths", "camera_depths")


class RobomimicFileError(StoreError):
    """A robomimic hdf5 file does not hold what robomimic writes; names file, group and key."""


def _is_image(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return dtype == np.uint8 and len(shape) == 4 and shape[-1] in (1, 3)


class RobomimicFile:
    """An open, validated robomimic hdf5 file (a context manager).

    Opening checks the structure (without reading observations): ``data`` holds only
    ``demo_<N>`` groups; ``env_args`` is a json object with ``env_name`` and ``env_kwargs``;
    each demo has ``num_samples``, the ``actions`` key chosen and the same ``obs`` keys, all of
    ``num_samples`` steps, with ``next_obs`` (if present) shaped like ``obs``; ``total`` is the sum
    of ``num_samples``; masks name existing demos; actions are finite (and, for ``actions``, in
    [-1, 1]). Values of observations are checked as :meth:`episodes` reads them.
    """

    def __init__(self, path: str | Path, actions: str = "actions") -> None:
        if actions not in ACTION_KEYS:
            raise ValueError(f"{path}: actions must be one of {ACTION_KEYS}, got {actions!r}")
        self.path, self.action_key = Path(path), actions
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:  # missing, not hdf5, truncated
            raise RobomimicFileError(f"{self.path}: /: cannot open as hdf5 ({e})") from None
        try:
            with self._reading("data"):
                self._validate()
        except BaseException:
            self._f.close()
            raise

    @contextlib.contextmanager
    def _reading(self, where: str) -> Iterator[None]:
        """An hdf5 read error (a corrupt block) as a :class:`RobomimicFileError` naming ``where``."""
        try:
            yield
        except OSError as e:
            raise self._err(where, f"unreadable ({e})") from None

    def _err(self, where: str, what: str) -> RobomimicFileError:
        return RobomimicFileError(f"{self.path}: {where}: {what}")

    def _validate(self) -> None:
        data = self._f.get("data")
        if not isinstance(data, h5py.Group):
            raise self._err("data", "missing: a robomimic file keeps its demos in the group data")
        self.demos = self._demo_names(data)
        self.env_args = self._env_args(data)
        self.obs_shapes = self._obs_shapes(self.demos[0])
        lengths = [self._check_demo(d) for d in self.demos]
        total = self._int_attr(data, "total", "the sum of the demos' num_samples")
        if total != sum(lengths):
            raise self._err(
                "data/total", f"attribute is {total!r}, but the demos' num_samples sum to {sum(lengths)}"
            )
        self.splits = self._splits()
        self.action_low, self.action_high = self._action_bounds()

    def _int_attr(self, group: h5py.Group, name: str, meaning: str) -> int:
        value = group.attrs.get(name)
        if value is None or np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.integer):
            raise self._err(
                f"{group.name.lstrip('/')}/{name}", f"attribute is {value!r}, expected an int ({meaning})"
            )
        return int(value)

    def _demo_names(self, data: h5py.Group) -> list[str]:
        numbered = []
        for name in data:
            m = _DEMO.fullmatch(name)
            if m is None or not isinstance(data[name], h5py.Group):
                raise self._err(f"data/{name}", "unexpected entry: data holds only groups demo_<N>")
            numbered.append((int(m.group(1)), name))
        if not numbered:
            raise self._err("data", "no demos (expected groups demo_<N>)")
        return [name for _, name in sorted(numbered)]

    def _env_args(self, data: h5py.Group) -> dict[str, Any]:
        raw = data.attrs.get("env_args")
        if raw is None:
            raise self._err("data/env_args", "missing attribute (the json robomimic rebuilds the env from)")
        try:
            env_args = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except ValueError as e:
            raise self._err("data/env_args", f"not valid json ({e})") from None
        if not (
            isinstance(env_args, dict)
            and isinstance(env_args.get("env_name"), str)
            and isinstance(env_args.get("env_kwargs"), dict)
        ):
            raise self._err(
                "data/env_args", "expected a json object with env_name (str) and env_kwargs (object)"
            )
        return env_args

    def _obs_shapes(self, demo: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-step shape and dtype of each observation key of ``demo`` (the reference demo)."""
        obs = self._f[f"data/{demo}"].get("obs")
        if not isinstance(obs, h5py.Group) or not len(obs):
            raise self._err(
                f"data/{demo}/obs",
                "missing or empty: expected a group of observation datasets (a file of states only, as "
                "convert_robosuite.py writes it, needs robomimic's dataset_states_to_obs.py first)",
            )
        shapes = {}
        for key, ds in obs.items():
            if ACTION_KEY == key or not isinstance(ds, h5py.Dataset):
                raise self._err(f"data/{demo}/obs/{key}", "expected an observation dataset (not 'action')")
            if not (_is_image(ds.shape, ds.dtype) or len(ds.shape) == 2):
                raise self._err(
                    f"data/{demo}/obs/{key}",
                    f"{ds.dtype}{ds.shape}: expected a low-dim (T, D) array or a uint8 (T, H, W, 3|1) image",
                )
            shapes[key] = (ds.shape[1:], ds.dtype)
        return shapes

    def _check_demo(self, demo: str) -> int:
        """Check one demo's structure against ``num_samples`` and the reference demo; its length."""
        g = self._f[f"data/{demo}"]
        n = self._int_attr(g, "num_samples", "the demo's number of steps")
        if n <= 0:
            raise self._err(f"data/{demo}/num_samples", f"{n}: a demo needs at least one step")
        act = g.get(self.action_key)
        if not isinstance(act, h5py.Dataset):
            have = [k for k in ACTION_KEYS if k in g]
            raise self._err(
                f"data/{demo}/{self.action_key}", f"missing (the demo has {have or 'no actions'})"
            )
        if act.ndim != 2 or act.shape[0] != n:
            raise self._err(
                f"data/{demo}/{self.action_key}", f"shape {act.shape}, but data/{demo} has num_samples {n}"
            )
        for group in ("obs", "next_obs"):
            if group == "next_obs" and group not in g:
                continue
            obs = g.get(group)
            keys = sorted(obs) if isinstance(obs, h5py.Group) else []
            if keys != sorted(self.obs_shapes):
                raise self._err(
                    f"data/{demo}/{group}",
                    f"keys {keys}, but data/{self.demos[0]}/obs has {sorted(self.obs_shapes)}",
                )
            for key, (step_shape, dtype) in self.obs_shapes.items():
                self._check_obs(f"data/{demo}/{group}/{key}", obs[key], n, step_shape, dtype)
        return n

    def _check_obs(self, where: str, ds: Any, n: int, step_shape: tuple[int, ...], dtype: np.dtype) -> None:
        if not isinstance(ds, h5py.Dataset):
            raise self._err(where, "expected a dataset")
        if ds.shape[0] != n:
            raise self._err(where, f"{ds.shape[0]} steps, but {where.rsplit('/', 2)[0]} has num_samples {n}")
        if ds.shape[1:] != step_shape or _is_image(ds.shape, ds.dtype) != _is_image((n, *step_shape), dtype):
            first = f"data/{self.demos[0]}/obs/{where.rsplit('/', 1)[1]}"
            raise self._err(where, f"{ds.dtype}{ds.shape[1:]} per step, but {first} has {dtype}{step_shape}")

    def _splits(self) -> dict[str, list[int]]:
        """``mask/<filter>`` -> sorted indices (in :attr:`demos`) of the demos it names."""
        mask = self._f.get("mask")
        if mask is None:
            return {}
        index = {name: i for i, name in enumerate(self.demos)}
        splits = {}
        for name, ds in mask.items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                raise self._err(f"mask/{name}", "expected a 1-D dataset of demo names (b'demo_1', ...)")
            names = [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]
            unknown = sorted(set(names) - set(index))
            if unknown:
                raise self._err(f"mask/{name}", f"names {unknown}, which are not demos in data/")
            splits[name] = sorted({index[v] for v in names})
        return splits

    def _action_bounds(self) -> tuple[list[float], list[float]]:
        """[-1, 1] per dim for ``actions`` (checked); the data's range for ``actions_abs``."""
        lows, highs = [], []
        dim = None
        for demo in self.demos:
            where = f"data/{demo}/{self.action_key}"
            a = np.asarray(self._f[where][()], dtype=np.float64)
            if dim is not None and a.shape[1] != dim:
                raise self._err(where, f"{a.shape[1]} dims, but data/{self.demos[0]} has {dim}")
            dim = a.shape[1]
            bad = ~np.isfinite(a).all(axis=1)
            if bad.any():
                raise self._err(where, f"NaN or inf at step {int(np.argmax(bad))}")
            outside = (np.abs(a) > DELTA_RANGE + 1e-6).any(axis=1)
            if self.action_key == "actions" and outside.any():
                t = int(np.argmax(outside))
                raise self._err(
                    where,
                    f"step {t}: {np.round(a[t], 4).tolist()} is outside robosuite's delta-action range "
                    "[-1, 1] (absolute actions belong in actions_abs)",
                )
            lows.append(a.min(axis=0))
            highs.append(a.max(axis=0))
        if self.action_key == "actions":
            return [-DELTA_RANGE] * dim, [DELTA_RANGE] * dim
        return np.min(lows, axis=0).tolist(), np.max(highs, axis=0).tolist()

    # -- reading --------------------------------------------------------------------------------
    @property
    def obs_kinds(self) -> dict[str, str]:
        return {k: "image" if _is_image((0, *s), d) else "lowdim" for k, (s, d) in self.obs_shapes.items()}

    def demo_number(self, demo: str) -> int:
        return int(demo.split("_")[1])

    def episode(self, demo: str) -> dict[str, np.ndarray]:
        """One demo as store steps: low-dim float32, images uint8 CHW, ``action`` float32."""
        g = self._f[f"data/{demo}"]
        with self._reading(f"data/{demo}/{self.action_key}"):
            steps = {ACTION_KEY: np.asarray(g[self.action_key][()], dtype=np.float32)}
        for key, kind in self.obs_kinds.items():
            with self._reading(f"data/{demo}/obs/{key}"):
                value = g["obs"][key][()]
            if kind == "image":
                steps[key] = np.ascontiguousarray(value.transpose(0, 3, 1, 2))
                continue
            value = value.astype(np.float32)
            bad = ~np.isfinite(value).all(axis=1)
            if bad.any():
                raise self._err(f"data/{demo}/obs/{key}", f"NaN or inf at step {int(np.argmax(bad))}")
            steps[key] = value
        return steps

    def episodes(self, progress: bool = False) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """``(demo name, steps)`` for every demo, in natural order."""
        for demo in tqdm(self.demos, desc=f"convert {self.path.name}", unit="demo", disable=not progress):
            yield demo, self.episode(demo)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RobomimicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def control_mode(env_args: dict[str, Any]) -> str:
    """The controller type of ``env_kwargs.controller_configs``: its ``type``, or for robosuite 1.5
    composite configs the arms' type (``right=A,left=B`` if they differ); ``unknown`` if absent."""
    cfg = env_args.get("env_kwargs", {}).get("controller_configs")
    if not isinstance(cfg, dict):
        return "unknown"
    parts = cfg.get("body_parts")
    if isinstance(parts, dict):
        parts = parts.get("arms", parts)  # robot default configs nest arms under body_parts.arms
        types = {p: c["type"] for p, c in parts.items() if isinstance(c, dict) and "type" in c}
        if len(set(types.values())) == 1:
            return next(iter(types.values()))
        if types:
            return ",".join(f"{p}={t}" for p, t in types.items())
    return str(cfg.get("type", "unknown"))


def task_for(env_name: str, path: Path) -> str:
    """The difftori task of a robosuite env name (error asking for ``--task`` when unknown)."""
    if env_name not in TASKS:
        raise RobomimicFileError(
            f"{path}: data/env_args: env_name {env_name!r} has no known difftori task "
            f"(known: {', '.join(f'{k}->{v}' for k, v in TASKS.items())}); pass the task (--task)"
        )
    return TASKS[env_name]


def convert_robomimic(
    src: str | Path,
    out: str | Path,
    *,
    task: str | None = None,
    suite: str = "robomimic",
    actions: str = "actions",
    seeds: Sequence[int] | None = None,
    zarr_format: int = 2,
    overwrite: bool = False,
    wait: bool = False,
    params: dict[str, Any] | None = None,
    progress: bool = True,
    attempts: int | None = None,
) -> EpisodeStore:
    """Convert the robomimic hdf5 file ``src`` into the episode store ``out`` (atomically).

    One episode per ``data/demo_<N>`` in natural order, with the seed ``seeds[i]`` (default: N).
    ``task`` defaults to the one of ``env_args``' env_name (:data:`TASKS`). ``actions`` picks the
    action key: ``actions`` (robosuite delta actions; the store's bounds are robosuite's [-1, 1]
    per dim and every action is checked to lie within) or ``actions_abs`` (absolute poses; bounds
    are the data's own min/max per dim). ``params`` (e.g. the generating config) is recorded in
    the metadata with ``env_args``, ``source_file``, ``actions`` and ``obs_options`` (the camera
    options of ``env_kwargs``, if any); ``mask/<filter>`` become the store's ``splits``.
    ``attempts``: how many episodes the generator tried to keep these (default: one per demo).

    ``out`` is locked first (a second writer fails at once; ``wait``: waits); an existing ``out``
    needs ``overwrite``. Raises :class:`RobomimicFileError` (a ``ValueError``) naming the file,
    hdf5 group and key for a file that is not what robomimic writes; nothing is left behind then.
    """
    src, out = Path(src), Path(out)
    with OutputLock(out, wait):
        EpisodeWriter.check_target(out, overwrite)
        with RobomimicFile(src, actions) as f:
            meta = _store_meta(f, task, suite, params)
            episode_seeds = _episode_seeds(f, seeds)
            log.info("%s: converting %d demos (%s) to %s", src, len(f.demos), meta.task, out)
            writer = EpisodeStore.create(out, meta, zarr_format=zarr_format, overwrite=overwrite)
            try:
                for (_, steps), seed in zip(f.episodes(progress), episode_seeds, strict=True):
                    writer.add_episode(steps, seed)
                writer.meta.splits = f.splits  # only now do the episodes exist
                if attempts is not None:
                    if attempts < writer.n_episodes:
                        raise ValueError(f"attempts ({attempts}) < demos in {src} ({writer.n_episodes})")
                    writer.meta.n_attempts = attempts
                return writer.commit()
            except BaseException:
                writer.discard()  # a conversion is rerun, never resumed
                raise


def _store_meta(f: RobomimicFile, task: str | None, suite: str, params: dict[str, Any] | None) -> StoreMeta:
    kwargs = f.env_args["env_kwargs"]
    ours = {
        "env_args": f.env_args,
        "source_file": str(f.path),
        "actions": f.action_key,
        "obs_options": {k: kwargs[k] for k in _CAMERA_OPTIONS if k in kwargs},
    }
    clash = sorted(k for k in ours if k in (params or {}) and params[k] != ours[k])
    if clash:
        raise ValueError(f"{f.path}: params {clash} are set by the conversion; leave them out of params")
    return StoreMeta(
        task=task or task_for(f.env_args["env_name"], f.path),
        suite=suite,
        source=f"robomimic-hdf5:{f.path.name}",
        obs_kinds=f.obs_kinds,
        action_low=f.action_low,
        action_high=f.action_high,
        control_mode=control_mode(f.env_args),
        params={**(params or {}), **ours},
    )


def _episode_seeds(f: RobomimicFile, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return [f.demo_number(d) for d in f.demos]
    if len(seeds) != len(f.demos):
        raise ValueError(f"{f.path}: {len(seeds)} seeds given for {len(f.demos)} demos (one per demo)")
    return [int(s) for s in seeds]
