"""The init-action store: K samples of a frozen base policy's action window at every demo step.

Layout (aligned step for step with the demo store it was computed on)::

    <inits>.zarr/
      data/init_action    (T_total, K, H, Da) float32, env units; row t = windows anchored at step t
      meta/episode_ends   (E,) int64, a copy of the demo store's
      .zattrs["difftori_inits"]  InitMeta: schema version, demos, policy, checkpoint, weights, ...

Written atomically (``<path>.partial`` then rename); opening validates the layout.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from difftori.datasets.episode_store import EPISODE_ENDS, EpisodeStore, StoreError
from difftori.datasets.safeio import OutputLock, naming_path

SCHEMA_VERSION = 1
ATTRS_KEY = "difftori_inits"
KEY = "data/init_action"


@dataclass
class InitMeta:
    demos: str  # the demo store the windows come from
    policy: str  # registry name of the base policy
    checkpoint: str  # its checkpoint directory
    weights: str  # "ema" or "raw": which weights produced the samples
    samples: int
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    seed: int
    demos_episode_seeds: list[int] = field(default_factory=list)
    folds: list[list[int]] = field(default_factory=list)  # cross-fitting: episodes of each fold base
    schema_version: int = SCHEMA_VERSION


class InitActionStore:
    """Read access to a validated init-action store."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: /: no such init-action store")
        root = zarr.open_group(str(self.path), mode="r")
        attrs = root.attrs.get(ATTRS_KEY)
        if not isinstance(attrs, dict) or attrs.get("schema_version") != SCHEMA_VERSION:
            version = attrs.get("schema_version") if isinstance(attrs, dict) else None
            raise StoreError(
                f"{self.path}: .zattrs/{ATTRS_KEY}/schema_version: unknown schema version {version!r}; "
                f"this difftori reads version {SCHEMA_VERSION}"
            )
        self.meta = InitMeta(**attrs)
        for key in (KEY, EPISODE_ENDS):
            if key not in root:
                raise StoreError(f"{self.path}: {key}: missing")
        self.episode_ends = np.asarray(root[EPISODE_ENDS][:])
        self.actions = root[KEY]
        expected = (int(self.episode_ends[-1]), self.meta.samples, self.meta.horizon)
        if self.actions.shape[:3] != expected:
            raise StoreError(f"{self.path}: {KEY}: shape {self.actions.shape}, expected {expected} + (Da,)")

    def check_aligned(self, store: EpisodeStore) -> None:
        """Raise unless this store was computed on exactly ``store``'s episodes."""
        if not np.array_equal(self.episode_ends, store.episode_ends) or (
            self.meta.demos_episode_seeds and self.meta.demos_episode_seeds != store.meta.episode_seeds
        ):
            raise StoreError(
                f"{self.path}: {EPISODE_ENDS}: not aligned with {store.path} "
                "(different episodes; recompute the init actions)"
            )

    @staticmethod
    def write(
        path: str | os.PathLike[str], actions: np.ndarray, episode_ends: np.ndarray, meta: InitMeta
    ) -> None:
        """Write ``actions`` (T, K, H, Da) atomically, holding ``<path>.lock``."""
        path = Path(path)
        if not np.isfinite(actions).all():
            raise StoreError(f"{path}: {KEY}: NaN or inf in the base policy's actions")
        partial = path.with_name(path.name + ".partial")
        with OutputLock(path), naming_path(partial):
            shutil.rmtree(partial, ignore_errors=True)
            root = zarr.open_group(str(partial), mode="w", zarr_format=2)
            comp = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
            arrays = {KEY: actions.astype(np.float32), EPISODE_ENDS: np.asarray(episode_ends, np.int64)}
            for key, data in arrays.items():  # zarr 3.0's create_array takes no data=
                chunks = (4096, *data.shape[1:]) if key == KEY else data.shape
                root.create_array(key, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=comp)[
                    ...
                ] = data
            root.attrs[ATTRS_KEY] = asdict(meta)
            if path.exists():
                shutil.rmtree(path)
            partial.rename(path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.meta)
