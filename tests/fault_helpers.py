"""Picklable evaluation factories that fail on purpose (spawned workers import this module).

:class:`FaultyEpisodes` stands in for ``difftori.eval.evaluate.PolicyEpisodes`` (same constructor)
and runs fake episodes whose record depends only on the env seed, so any two runs agree. Faults are
set through environment variables, which spawned workers inherit:

* ``FAULT_DIR``: a folder; each episode run touches ``ran-<seed>-<n>`` there (to count runs).
* ``FAULT_KILL_START``: SIGKILL a worker while it builds its envs, once (the first worker).
* ``FAULT_KILL_RUN``: SIGKILL a worker while it runs this seed, once.
* ``FAULT_SLOW``: seconds each control step takes.
"""

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftori.eval.results import EpisodeRecord


def _once(name: str) -> bool:
    """True the first time ``name`` is asked for in ``FAULT_DIR`` (across processes)."""
    try:
        fd = os.open(Path(os.environ["FAULT_DIR"]) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def expected_record(episode: int, seed: int) -> dict[str, Any]:
    """The fields of a fake episode's record that do not depend on timing."""
    return {"episode": episode, "env_seed": seed, "success": seed % 2 == 0, "steps": seed % 3 + 1}


class FaultyBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.left: dict[tuple[int, int], int] = {}

    @property
    def running(self) -> int:
        return len(self.left)

    def start(self, episode: int, seed: int) -> None:
        self.left[(episode, seed)] = seed % 3 + 1
        runs = len(list(Path(os.environ["FAULT_DIR"]).glob(f"ran-{seed}-*")))
        (Path(os.environ["FAULT_DIR"]) / f"ran-{seed}-{runs}").touch()

    def advance(self) -> list[EpisodeRecord]:
        time.sleep(float(os.environ.get("FAULT_SLOW", "0")))
        done = []
        for episode, seed in list(self.left):
            if str(seed) == os.environ.get("FAULT_KILL_RUN") and _once(f"killed-run-{seed}"):
                os.kill(os.getpid(), signal.SIGKILL)
            self.left[(episode, seed)] -= 1
            if not self.left[(episode, seed)]:
                del self.left[(episode, seed)]
                e = expected_record(episode, seed)
                done.append(EpisodeRecord(episode, seed, success=e["success"], steps=e["steps"], ret=1.0))
        return done


@dataclass(frozen=True)
class FaultyEpisodes:
    """Same constructor as ``PolicyEpisodes``; builds a :class:`FaultyBatch` of ``envs`` envs."""

    meta: Any
    loader: Any
    cfg: Any
    envs: int = 1
    video_dir: str | None = None

    def __call__(self) -> FaultyBatch:
        if os.environ.get("FAULT_KILL_START") and _once("killed-start"):
            os.kill(os.getpid(), signal.SIGKILL)  # killed while building its envs and policy
        return FaultyBatch(self.envs)
