"""The episode store: the one class that knows difftori's on-disk demonstration format.

Layout (diffusion_policy's ``ReplayBuffer``, so diffusion_policy and DP3 read our stores unchanged)::

    <store>.zarr/
      data/<key>          (T_total, ...)  every step of every episode, concatenated; chunked along time
      meta/episode_ends   (E,) int64      exclusive end index of each episode in data/*
      .zattrs["difftori"]                 StoreMeta: schema version, source, task, key kinds, ...

Schema version 2 added ``splits`` (named subsets of episodes, e.g. robomimic's train/valid masks;
bumped because version-1 readers would silently drop them); version-1 stores are still read.

``data/action`` holds the actions; every other ``data/<key>`` is an observation whose kind
(``point_cloud``, ``image``, ``lowdim``) is recorded in the metadata. Zarr *format 2* is written by
default because zarr-python 2 (used by diffusion_policy and DP3) cannot open format-3 stores.

Writes are atomic: an :class:`EpisodeWriter` fills ``<store>.partial`` and renames it on
:meth:`EpisodeWriter.commit`. Bad data discards the partial store; any other interruption keeps it
so that a rerun with ``resume=True`` continues where it stopped. A writer holds ``<store>.lock``
(one writer per store) and records a sha256 of every array in the metadata (``checksums``);
opening checks that every chunk file exists, :meth:`EpisodeStore.verify` checks the checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from difftori.datasets.safeio import OutputLock, array_sha256, naming_path, remove_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no ``splits``
ATTRS_KEY = "difftori"
ACTION_KEY = "action"
EPISODE_ENDS = "meta/episode_ends"
KINDS = ("point_cloud", "image", "lowdim")
_CHUNK_BYTES = 1 << 20  # ~1 MiB per chunk along time
_VALIDATE_STEPS = 4096  # steps read at a time when checking for NaN/inf


class StoreError(ValueError):
    """A store (or data written to it) does not match the format. The message names path and key."""


def _err(path: Path | str, key: str, what: str) -> StoreError:
    return StoreError(f"{path}: {key}: {what}")


@dataclass
class StoreMeta:
    """What a store holds and how it was made (saved as the root attribute ``difftori``)."""

    task: str
    source: str  # the generator ("<suite>-expert") or the converted file
    obs_kinds: dict[str, str]  # observation key -> one of KINDS
    action_low: list[float]
    action_high: list[float]
    control_mode: str
    suite: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # the parameters that produced the store
    episode_seeds: list[int] = field(default_factory=list)  # one per kept episode
    n_attempts: int = 0  # episodes tried, kept or not
    checksums: dict[str, str] = field(default_factory=dict)  # array path -> sha256, set on commit
    splits: dict[str, list[int]] = field(default_factory=dict)  # name -> sorted episode indices
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.obs_kinds.items() if v not in KINDS}
        if bad:
            raise StoreError(f"obs_kinds: unknown kinds {bad}, expected one of {KINDS}")
        if ACTION_KEY in self.obs_kinds:
            raise StoreError(f"obs_kinds: '{ACTION_KEY}' is the action, not an observation")
        if len(self.action_low) != len(self.action_high):
            raise StoreError("action_low/action_high: lengths differ")
        if not isinstance(self.splits, dict):
            raise StoreError(f"splits: expected {{name: [episode, ...]}}, got {self.splits!r}")
        for name, episodes in self.splits.items():
            ok = isinstance(episodes, list) and all(type(e) is int and e >= 0 for e in episodes)
            if not ok or episodes != sorted(set(episodes)):
                raise StoreError(
                    f"splits/{name}: expected sorted, distinct episode indices (ints >= 0), got {episodes!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | str = "<memory>") -> StoreMeta:
        """Build from saved attributes; unknown schema versions and missing fields are errors."""
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise _err(
                path,
                f".zattrs/{ATTRS_KEY}/schema_version",
                f"unknown schema version {version!r}; this difftori reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
            )
        names = set(cls.__dataclass_fields__)
        missing = {"task", "source", "obs_kinds", "action_low", "action_high", "control_mode"} - set(d)
        if missing:
            raise _err(path, f".zattrs/{ATTRS_KEY}", f"missing fields {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except StoreError as e:
            raise _err(path, f".zattrs/{ATTRS_KEY}", str(e)) from None

    @property
    def action_dim(self) -> int:
        return len(self.action_low)


def _chunk_steps(step_shape: tuple[int, ...], dtype: np.dtype) -> int:
    step_bytes = int(np.prod(step_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(16, min(8192, _CHUNK_BYTES // max(step_bytes, 1))))


def _compressor(zarr_format: int) -> Any:
    if zarr_format == 2:
        return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _check_finite(path: Path | str, key: str, arr: Any, offset: int = 0) -> None:
    """Raise naming the first step of ``arr`` that holds NaN or inf (float arrays only)."""
    if not np.issubdtype(arr.dtype, np.floating):
        return
    for start in range(0, arr.shape[0], _VALIDATE_STEPS):
        block = np.asarray(arr[start : start + _VALIDATE_STEPS])
        finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
        if not finite.all():
            step = offset + start + int(np.argmin(finite))
            raise _err(path, f"data/{key}", f"NaN or inf at step {step}")


class EpisodeStore:
    """Read access to a validated store: whole episodes or windows of one episode.

    Opening checks everything a consumer relies on and raises :class:`StoreError` naming the
    path and key: missing ``meta/episode_ends``, empty store, unknown schema version, arrays
    whose length differs from the last episode end, a missing chunk file, a number of recorded
    episode seeds other than the number of episodes, splits naming episodes beyond the store,
    NaN/inf in actions or observations.
    :meth:`verify` also checks every array against the checksums recorded at write time.
    """

    def __init__(self, path: str | os.PathLike[str], *, check_values: bool = True) -> None:
        self.path = Path(path)
        self._root, self.meta, self.episode_ends = _open_validated(self.path, check_values)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1])

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    @property
    def keys(self) -> list[str]:
        """Every ``data/<key>``: the observations and ``action``."""
        return sorted(self._root["data"].array_keys())

    @property
    def zarr_format(self) -> int:
        return int(self._root.metadata.zarr_format)

    def verify(self) -> str:
        """Check every array against the checksums recorded when the store was written.

        Returns a digest of the whole content (for resume and provenance checks); raises
        :class:`StoreError` naming the array on a mismatch or when no checksums were recorded.
        """
        where = f".zattrs/{ATTRS_KEY}/checksums"
        if not self.meta.checksums:
            raise _err(
                self.path,
                where,
                "none recorded (written before difftori recorded them), so the content cannot be "
                "verified; regenerate the store (difftori demos ... --overwrite)",
            )
        names = _array_names(self._root)
        if set(self.meta.checksums) != set(names):
            raise _err(self.path, where, f"records {sorted(self.meta.checksums)}, the store holds {names}")
        for name in names:
            try:
                got = array_sha256(self._root[name])
            except Exception as e:  # a corrupt chunk fails to decompress in zarr/numcodecs
                raise _err(self.path, name, f"unreadable ({type(e).__name__}: {e}); regenerate it") from None
            if got != self.meta.checksums[name]:
                raise _err(
                    self.path,
                    name,
                    f"checksum mismatch: the data hashes to {got[:19]}..., the store recorded "
                    f"{self.meta.checksums[name][:19]}... when written (corrupt or modified); regenerate it",
                )
        digest = hashlib.sha256(json.dumps(self.meta.checksums, sort_keys=True).encode())
        return "sha256:" + digest.hexdigest()

    def array(self, key: str) -> zarr.Array:
        """The raw, lazily read ``data/<key>`` array (all episodes concatenated)."""
        if key not in self._root["data"]:
            raise _err(self.path, f"data/{key}", f"no such key; the store has {self.keys}")
        return self._root["data"][key]

    def episode_slice(self, episode: int) -> slice:
        if not 0 <= episode < self.n_episodes:
            raise IndexError(f"{self.path}: episode {episode} out of range 0..{self.n_episodes - 1}")
        start = 0 if episode == 0 else int(self.episode_ends[episode - 1])
        return slice(start, int(self.episode_ends[episode]))

    # -- reading --------------------------------------------------------------------------------
    def episode(self, episode: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """All steps of one episode, as ``{key: (T, ...)}`` numpy arrays."""
        s = self.episode_slice(episode)
        return {k: np.asarray(self.array(k)[s]) for k in (keys or self.keys)}

    def window(
        self, episode: int, start: int, stop: int, keys: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Steps ``start:stop`` (episode-local indices) of one episode."""
        s = self.episode_slice(episode)
        length = s.stop - s.start
        if not 0 <= start < stop <= length:
            raise IndexError(f"{self.path}: window {start}:{stop} outside episode {episode} (0:{length})")
        return {k: np.asarray(self.array(k)[s.start + start : s.start + stop]) for k in (keys or self.keys)}

    # -- writing --------------------------------------------------------------------------------
    @staticmethod
    def create(
        path: str | os.PathLike[str],
        meta: StoreMeta,
        *,
        zarr_format: int = 2,
        overwrite: bool = False,
        resume: bool = False,
        wait: bool = False,
    ) -> EpisodeWriter:
        """Start writing a store at ``path`` (atomic, one writer at a time: see :class:`EpisodeWriter`)."""
        return EpisodeWriter(
            path, meta, zarr_format=zarr_format, overwrite=overwrite, resume=resume, wait=wait
        )


def _array_names(root: zarr.Group) -> list[str]:
    """Every array of a store: ``meta/episode_ends`` and ``data/<key>``."""
    return [EPISODE_ENDS, *(f"data/{k}" for k in sorted(root["data"].array_keys()))]


def _check_chunks(path: Path, root: zarr.Group) -> None:
    """Every chunk of every array must be a file: zarr would read a missing one as zeros."""
    for name in _array_names(root):
        arr = root[name]
        grid = [range(math.ceil(n / c)) for n, c in zip(arr.shape, arr.chunks, strict=True)]
        for coords in itertools.product(*grid):
            key = arr.metadata.encode_chunk_key(coords)
            if not (path / name / key).is_file():
                raise _err(
                    path,
                    name,
                    f"chunk file {key} is missing (deleted or never written), so its steps would read "
                    "as zeros; regenerate the store",
                )


def _open_validated(path: Path, check_values: bool) -> tuple[zarr.Group, StoreMeta, np.ndarray]:
    if not path.exists():
        raise _err(path, "/", "no such store")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several types for "not a group"
        raise _err(path, "/", f"not a zarr group ({type(e).__name__}: {e})") from None
    attrs = root.attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict):
        raise _err(path, f".zattrs/{ATTRS_KEY}", "missing store attributes (schema_version, task, ...)")
    meta = StoreMeta.from_dict(attrs, path)
    if EPISODE_ENDS not in root:
        raise _err(path, EPISODE_ENDS, "missing: the store has no episode index")
    ends = np.asarray(root[EPISODE_ENDS][:], dtype=np.int64)
    if ends.size == 0:
        raise _err(path, EPISODE_ENDS, "empty store: 0 episodes")
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise _err(path, EPISODE_ENDS, "episode ends must be positive and strictly increasing")
    if len(meta.episode_seeds) != len(ends):
        raise _err(
            path,
            f".zattrs/{ATTRS_KEY}/episode_seeds",
            f"{len(meta.episode_seeds)} seeds recorded for {len(ends)} episodes in {EPISODE_ENDS}",
        )
    for name, episodes in meta.splits.items():
        if episodes and episodes[-1] >= len(ends):
            raise _err(
                path,
                f".zattrs/{ATTRS_KEY}/splits/{name}",
                f"episode {episodes[-1]} out of range: the store has {len(ends)} episodes",
            )
    if "data" not in root or ACTION_KEY not in root["data"]:
        raise _err(path, f"data/{ACTION_KEY}", "missing: the store has no actions")
    data_keys = set(root["data"].array_keys())
    if data_keys - {ACTION_KEY} != set(meta.obs_kinds):
        raise _err(
            path,
            f".zattrs/{ATTRS_KEY}/obs_kinds",
            f"lists {sorted(meta.obs_kinds)} but data/ holds {sorted(data_keys - {ACTION_KEY})}",
        )
    _check_chunks(path, root)
    for key in sorted(data_keys):
        arr = root["data"][key]
        if arr.shape[0] != ends[-1]:
            raise _err(
                path,
                f"data/{key}",
                f"length {arr.shape[0]} does not match the last episode end {int(ends[-1])}",
            )
        if check_values:
            _check_finite(path, key, arr)
    if root["data"][ACTION_KEY].shape[1:] != (meta.action_dim,):
        raise _err(
            path,
            f"data/{ACTION_KEY}",
            f"shape {root['data'][ACTION_KEY].shape} does not match action bounds of dim {meta.action_dim}",
        )
    return root, meta, ends


class EpisodeWriter:
    """Appends episodes to ``<path>.partial`` and renames it to ``path`` on :meth:`commit`.

    Use as a context manager: leaving the block normally commits; a :class:`StoreError` (bad data)
    deletes the partial store; any other exception (Ctrl-C, a crash) keeps it, and a writer created
    with ``resume=True`` continues from its complete episodes. The writer holds ``<path>.lock``
    from creation to commit or discard: a second writer raises ``LockedError`` (or, with
    ``wait=True``, waits). Every chunk is written, even all-zero ones, so a missing chunk file is
    always an error.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: StoreMeta,
        *,
        zarr_format: int = 2,
        overwrite: bool = False,
        resume: bool = False,
        wait: bool = False,
    ) -> None:
        if zarr_format not in (2, 3):
            raise StoreError(f"{path}: zarr_format must be 2 or 3, got {zarr_format}")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._lock = OutputLock(self.path, wait).acquire()
        try:
            self.check_target(self.path, overwrite)
            self.zarr_format = zarr_format
            # The writer owns what it records per episode: a fresh store starts with none of the
            # caller's seeds, attempts or checksums (e.g. a meta copied from another store).
            self.meta = replace(meta, episode_seeds=[], n_attempts=0, checksums={})
            self._committed = False
            with self._writing():
                if resume and self.partial.exists() and self._resume():
                    return
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            with self._writing():
                self._root = zarr.open_group(str(self.partial), mode="w", zarr_format=zarr_format)
                self._root.create_group("data")
                compressors = _compressor(zarr_format)
                self._root.create_array(
                    EPISODE_ENDS, shape=(0,), chunks=(4096,), dtype="int64", compressors=compressors
                )
                self._flush_meta()
        except BaseException:
            self._lock.release()
            raise

    @staticmethod
    def check_target(path: Path, overwrite: bool) -> None:
        """Refuse an existing output unless ``overwrite``, and never replace a non-store file."""
        if not path.exists():
            return
        if not overwrite:
            raise StoreError(f"{path}: /: already exists (pass overwrite to replace it)")
        if not path.is_dir():
            raise StoreError(
                f"{path}: /: exists and is a file, not a store; overwrite replaces stores only "
                "(remove the file yourself)"
            )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Zarr writes that store every chunk, and OS errors (a full disk) that name the store."""
        with naming_path(self.partial), zarr.config.set({"array.write_empty_chunks": True}):
            yield

    # -- state ----------------------------------------------------------------------------------
    @property
    def n_episodes(self) -> int:
        return int(self._root[EPISODE_ENDS].shape[0])

    @property
    def n_steps(self) -> int:
        ends = self._root[EPISODE_ENDS]
        return int(ends[-1]) if ends.shape[0] else 0

    def _flush_meta(self) -> None:
        self._root.attrs[ATTRS_KEY] = self.meta.to_dict()

    def _resume(self) -> bool:
        """Reopen the partial store if it was made by the same task and params; drop torn writes."""
        try:
            root = zarr.open_group(str(self.partial), mode="r+")
            old = StoreMeta.from_dict(root.attrs[ATTRS_KEY], self.partial)
        except Exception as e:  # unreadable partial store: start over
            log.warning("%s: cannot resume (%s); starting over", self.partial, e)
            return False
        if (old.task, old.params, root.metadata.zarr_format) != (
            self.meta.task,
            self.meta.params,
            self.zarr_format,
        ):
            log.warning("%s: made with other task/params; starting over", self.partial)
            return False
        self._root = root
        n, end = self.n_episodes, self.n_steps
        for key in root["data"].array_keys():  # a crash between appends leaves arrays too long
            arr = root["data"][key]
            if arr.shape[0] != end:
                arr.resize((end, *arr.shape[1:]))
        self.meta = old
        self.meta.schema_version = SCHEMA_VERSION  # a version-1 partial store is written as current
        self.meta.episode_seeds = old.episode_seeds[:n]
        self.meta.n_attempts = max(old.n_attempts, n)
        self._flush_meta()
        log.info("%s: resuming after %d episodes (%d attempts)", self.partial, n, self.meta.n_attempts)
        return True

    # -- appending ------------------------------------------------------------------------------
    def add_episode(self, steps: dict[str, np.ndarray], seed: int) -> None:
        """Append one episode: ``{key: (T, ...)}`` for ``action`` and every observation key."""
        expected = {ACTION_KEY, *self.meta.obs_kinds}
        if set(steps) != expected:
            raise _err(
                self.partial,
                "data",
                f"episode keys {sorted(steps)} differ from the store's {sorted(expected)}",
            )
        lengths = {k: len(v) for k, v in steps.items()}
        if len(set(lengths.values())) != 1 or not lengths[ACTION_KEY]:
            raise _err(self.partial, "data", f"episode arrays must share a non-zero length, got {lengths}")
        if steps[ACTION_KEY].shape[1:] != (self.meta.action_dim,):
            raise _err(
                self.partial,
                f"data/{ACTION_KEY}",
                f"expected shape (T, {self.meta.action_dim}), got {steps[ACTION_KEY].shape}",
            )
        low, high = np.asarray(self.meta.action_low), np.asarray(self.meta.action_high)
        outside = np.any((steps[ACTION_KEY] < low - 1e-6) | (steps[ACTION_KEY] > high + 1e-6), axis=1)
        if outside.any():
            t = int(np.argmax(outside))
            raise _err(
                self.partial,
                f"data/{ACTION_KEY}",
                f"action {steps[ACTION_KEY][t].tolist()} at step {self.n_steps + t} is outside the "
                f"store's bounds [{self.meta.action_low}, {self.meta.action_high}]",
            )
        for key, value in steps.items():
            _check_finite(self.partial, key, np.asarray(value), offset=self.n_steps)
        with self._writing():
            self._append(steps, lengths[ACTION_KEY], seed)

    def _append(self, steps: dict[str, np.ndarray], length: int, seed: int) -> None:
        data = self._root["data"]
        for key, value in steps.items():
            value = np.asarray(value)
            if key not in data:
                data.create_array(
                    key,
                    shape=(0, *value.shape[1:]),
                    chunks=(_chunk_steps(value.shape[1:], value.dtype), *value.shape[1:]),
                    dtype=value.dtype,
                    compressors=_compressor(self.zarr_format),
                )
            elif data[key].shape[1:] != value.shape[1:] or data[key].dtype != value.dtype:
                raise _err(
                    self.partial,
                    f"data/{key}",
                    f"expected {data[key].dtype}{data[key].shape[1:]} per step, "
                    f"got {value.dtype}{value.shape[1:]}",
                )
        # Arrays first, then the episode index, then attributes: a crash in between is repaired
        # on resume by truncating the arrays to the last recorded episode end.
        for key, value in steps.items():
            data[key].append(np.asarray(value), axis=0)
        self._root[EPISODE_ENDS].append(np.array([self.n_steps + length]), axis=0)
        self.meta.episode_seeds.append(int(seed))
        self.meta.n_attempts += 1
        self._flush_meta()

    def skip_episode(self, seed: int) -> None:
        """Record an attempt whose episode is not kept (e.g. the expert failed)."""
        self.meta.n_attempts += 1
        with self._writing():
            self._flush_meta()

    # -- finishing ------------------------------------------------------------------------------
    def commit(self) -> EpisodeStore:
        """Record the checksums, validate the partial store and move it to its final path
        (replacing any old one); releases the lock."""
        with self._writing():
            self.meta.checksums = {name: array_sha256(self._root[name]) for name in _array_names(self._root)}
            self._flush_meta()
        EpisodeStore(self.partial, check_values=False)  # structure; values were checked on append
        old = self.path.with_name(self.path.name + f".old-{os.getpid()}")
        if self.path.exists():
            self.path.rename(old)
        self.partial.rename(self.path)
        remove_path(old)
        self._committed = True
        self._lock.release()
        store = EpisodeStore(self.path, check_values=False)
        log.info("wrote %s (%d episodes, %d steps)", self.path, store.n_episodes, store.n_steps)
        return store

    def discard(self) -> None:
        """Delete the partial store; releases the lock."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self._lock.release()

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            if not self._committed:
                try:
                    self.commit()
                except StoreError:
                    self.discard()
                    raise
        elif issubclass(exc_type, StoreError):
            self.discard()
        elif self.partial.exists():
            log.warning("%s kept after %s: rerun with resume to continue", self.partial, exc_type.__name__)
        self._lock.release()
