"""Picklable episode factories for the worker-pool tests (spawned workers import this module)."""

import os
from dataclasses import dataclass
from pathlib import Path

from difftori.eval.results import EpisodeRecord


@dataclass(frozen=True)
class FlakyEpisodes:
    """Succeeds on even seeds. ``crash_once`` seeds kill their worker on the first attempt (a marker
    file remembers it); ``raise_always`` seeds raise on every attempt; ``die_always`` always kill."""

    marker_dir: str
    crash_once: tuple[int, ...] = ()
    raise_always: tuple[int, ...] = ()
    die_always: tuple[int, ...] = ()

    def __call__(self):
        def run(episode: int, seed: int) -> EpisodeRecord:
            marker = Path(self.marker_dir) / f"crashed{seed}"
            if seed in self.crash_once and not marker.exists():
                marker.touch()
                os._exit(3)
            if seed in self.die_always:
                os._exit(4)
            if seed in self.raise_always:
                raise RuntimeError(f"seed {seed} is cursed")
            return EpisodeRecord(episode, seed, success=seed % 2 == 0, steps=seed, ret=float(seed))

        return run
