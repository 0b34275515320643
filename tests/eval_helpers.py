"""Picklable episode factories for the worker-pool tests (spawned workers import this module)."""

import os
from dataclasses import dataclass
from pathlib import Path

from difftori.eval.results import EpisodeRecord


class FlakyBatch:
    """Episodes that last ``seed % 3 + 1`` control steps (so they finish out of order)."""

    def __init__(self, spec: "FlakyEpisodes") -> None:
        self.spec = spec
        self.left: dict[tuple[int, int], int] = {}  # (episode, seed) -> control steps left

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def running(self) -> int:
        return len(self.left)

    def start(self, episode: int, seed: int) -> None:
        assert len(self.left) < self.capacity, "the parent sent more episodes than the worker holds"
        self.left[(episode, seed)] = seed % 3 + 1

    def advance(self) -> list[EpisodeRecord]:
        spec, done = self.spec, []
        for episode, seed in list(self.left):
            marker = Path(spec.marker_dir) / f"crashed{seed}"
            if seed in spec.crash_once and not marker.exists():
                marker.touch()
                os._exit(3)
            if seed in spec.die_always:
                os._exit(4)
            if seed in spec.raise_always:
                raise RuntimeError(f"seed {seed} is cursed")
            self.left[(episode, seed)] -= 1
            if not self.left[(episode, seed)]:
                del self.left[(episode, seed)]
                done.append(EpisodeRecord(episode, seed, success=seed % 2 == 0, steps=seed, ret=float(seed)))
        return done


@dataclass(frozen=True)
class FlakyEpisodes:
    """Succeeds on even seeds. ``crash_once`` seeds kill their worker on the first attempt (a marker
    file remembers it); ``raise_always`` seeds raise on every attempt; ``die_always`` always kill."""

    marker_dir: str
    crash_once: tuple[int, ...] = ()
    raise_always: tuple[int, ...] = ()
    die_always: tuple[int, ...] = ()
    capacity: int = 1

    def __call__(self) -> FlakyBatch:
        return FlakyBatch(self)
