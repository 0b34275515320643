"""Safe outputs: one writer at a time, atomic files, content hashes, OS errors that name a path.

* :class:`OutputLock` is the exclusive-writer lock of an output (a store, a checkpoint directory,
  a results file): an OS file lock on ``<out>.lock`` (``filelock``; released by the kernel when
  the holder dies, so it is never stale; the file is removed on release). A second writer fails
  at once with :class:`LockedError` naming the holder (pid, host, command, since when), or waits
  with ``wait=True``. Locks are
  reentrant within a process, so a stage that locks its output can call writers that lock it too.
* :func:`atomic_write` / :func:`atomic_write_text` write a file beside its target and rename it
  (same filesystem).
* :func:`array_sha256` / :func:`file_sha256` are the checksums stores and checkpoints record.
* :func:`naming_path` re-raises an ``OSError`` that names no file (a full disk) with ``path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_HASH_STEPS = 4096  # leading-axis entries hashed at a time
_HELD: dict[str, list[Any]] = {}  # lock file -> [FileLock, depth] held by this process


class LockedError(RuntimeError):
    """Another process is writing the same output."""


def lock_file(out: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``<out>.lock`` beside it."""
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def is_secondary_rank() -> bool:
    """True in a non-zero rank of a distributed (DDP/SLURM) run: rank 0 holds the output's lock."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in ranks)


def _write_holder(fd: int) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def lock_holder(path: str | os.PathLike[str], patience_s: float = 1.0) -> str:
    """Who holds the lock file ``path``, as recorded by the holder.

    The holder writes its record just after it wins the lock, so a reader that loses the race by
    microseconds may find the file still empty: it re-reads for up to ``patience_s``.
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            h = json.loads(Path(path).read_text())
            return f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)


class OutputLock:
    """Exclusive-writer lock of ``out`` (see the module docstring); a context manager."""

    def __init__(self, out: str | os.PathLike[str], wait: bool = False) -> None:
        self.out, self.wait = Path(out), wait
        self.path = lock_file(self.out)
        self._key: str | None = None

    def acquire(self) -> OutputLock:
        if self._key is not None or is_secondary_rank():
            return self
        key = os.path.abspath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(key, timeout=0, on_acquired=_write_holder, preserve_lock_file=True)
        try:
            lock.acquire()
        except Timeout:
            holder = lock_holder(key)
            if not self.wait:
                raise LockedError(
                    f"{self.out}: being written by {holder} (lock {self.path}); "
                    "wait for it to finish, or pass --wait to queue behind it"
                ) from None
            log.info("%s: waiting for %s to finish", self.out, holder)
            lock.acquire(timeout=-1)
        _HELD[key] = [lock, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        entry = _HELD[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            # Unlinked while still held, so no lock file is left behind; a waiter that opened the
            # old file sees it unlinked after winning it and retries (filelock checks st_nlink).
            with contextlib.suppress(OSError):
                os.unlink(self._key)
            entry[0].release()
            del _HELD[self._key]
        self._key = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def naming_path(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an ``OSError`` without a file name (e.g. ENOSPC from a write) naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, then a rename
    (the temporary file is removed if ``write`` fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_path(path):
            write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, fsync, rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def remove_path(path: str | os.PathLike[str]) -> None:
    """Delete a file or a directory tree, if present."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def array_sha256(arr: Any) -> str:
    """``sha256:<hex>`` of an array's dtype, shape and values (C order), read in blocks (zarr or numpy)."""
    h = hashlib.sha256(f"{np.dtype(arr.dtype).str}{tuple(arr.shape)}".encode())
    for start in range(0, arr.shape[0], _HASH_STEPS):
        h.update(np.ascontiguousarray(arr[start : start + _HASH_STEPS]).tobytes())
    return "sha256:" + h.hexdigest()
