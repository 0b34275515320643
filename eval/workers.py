"""Episodes in worker processes: one simulator per process (spawn start method), retries on crashes.

``run_in_workers(factory, seeds, workers, per_worker)`` starts ``workers`` processes with the
``spawn`` start method (rendering contexts and simulators never share or inherit a process). Each
calls ``factory()`` once, on its first job, to build its :class:`EpisodeBatch` (its envs and
policy), then runs up to ``per_worker`` episodes at once: the parent sends it one job
``(episode, seed)`` per free env over its own pipe, the worker advances all its running episodes
together and sends back one message per finished episode, and the parent sends the next job to
the env that freed up. The parent always knows which episodes each worker holds, so when a worker
raises (it reports the traceback and exits) or its process dies (segfault, OOM kill), every episode
it had in flight is retried once on a fresh worker. Retried episodes run alone, one per worker,
so an episode that brings its worker down cannot take the same batch-mates with it twice; a second
failure is recorded as ``status="error"`` with the reason, never as a task failure. Any failure of a
worker's pipe (EOF, a reset or broken connection from a worker killed while starting) takes the
same retry path. ``on_record`` sees each final record as it arrives (the evaluation's journal), and
``finished`` records (a resumed run's) are kept and not run again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from difftori.eval.results import EpisodeRecord
from tqdm import tqdm

log = logging.getLogger(__name__)


class EpisodeBatch(Protocol):
    """A worker's episodes, up to ``capacity`` at once, advanced together."""

    @property
    def capacity(self) -> int: ...

    @property
    def running(self) -> int: ...

    def start(self, episode: int, seed: int) -> None:
        """Begin episode ``episode`` (env seed ``seed``) in a free env."""

    def advance(self) -> list[EpisodeRecord]:
        """One control step of every running episode; the records of those that finished."""


class EpisodeFactory(Protocol):
    """Picklable; called once in each worker to build that worker's envs and policy."""

    def __call__(self) -> EpisodeBatch: ...


def _worker(factory: EpisodeFactory, conn: Connection) -> None:
    batch: EpisodeBatch | None = None
    try:
        while True:
            while batch is None or not batch.running or conn.poll():  # wait for jobs only when idle
                job = conn.recv()
                if job is None:
                    return
                if batch is None:
                    batch = factory()
                batch.start(*job)
            for record in batch.advance():
                conn.send(("done", record))
    except Exception:  # reported to the parent, which retries what this worker held
        conn.send(("error", traceback.format_exc(limit=5)))


@dataclass
class _Slot:
    proc: Any
    conn: Connection  # the parent's end of this worker's own pipe (a dying worker poisons nothing else)
    episodes: set[int] = field(default_factory=set)  # in flight
    gone: bool = False  # raised or died; replaced when there is work left


class _Pool:
    """The parent's bookkeeping: which worker holds which episodes, attempts, records, progress."""

    def __init__(
        self,
        factory: EpisodeFactory,
        seeds: list[int],
        per_worker: int,
        retries: int,
        bar: tqdm,
        on_record: Callable[[EpisodeRecord], None] | None = None,
        finished: dict[int, EpisodeRecord] | None = None,
    ) -> None:
        self.factory, self.seeds, self.bar = factory, seeds, bar
        self.per_worker, self.retries, self.on_record = per_worker, retries, on_record
        self.ctx = mp.get_context("spawn")
        finished = finished or {}
        self.todo: deque[int] = deque(e for e in range(len(seeds)) if e not in finished)
        self.retry: deque[int] = deque()  # failed once: each runs alone on a worker
        self.attempts = [0] * len(seeds)
        self.records: list[EpisodeRecord | None] = [finished.get(e) for e in range(len(seeds))]
        self.successes = sum(r.success for r in finished.values())

    def start(self) -> _Slot:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(self.factory, child), daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def fill(self, slot: _Slot) -> None:
        """Send the worker jobs: a retried episode to an idle worker alone, else up to per_worker."""
        if self.retry:  # retries first: workers take no new episodes until one is idle for them
            if not slot.episodes:
                self._send(slot, self.retry.popleft())
            return
        if any(self.attempts[e] > 1 for e in slot.episodes):
            return  # a retried episode is running alone here
        while self.todo and len(slot.episodes) < self.per_worker:
            self._send(slot, self.todo.popleft())

    def _send(self, slot: _Slot, episode: int) -> None:
        self.attempts[episode] += 1
        slot.episodes.add(episode)
        with contextlib.suppress(OSError):  # a dead worker: its sentinel fires, and collect() retries
            slot.conn.send((episode, self.seeds[episode]))

    def collect(self, slot: _Slot) -> bool:
        """Handle the worker's messages; False if it is gone (its episodes in flight have failed)."""
        dead = not slot.proc.is_alive()  # checked first: what it sent before dying is in the pipe
        reason = None
        while reason is None and slot.conn.poll():
            try:
                kind, payload = slot.conn.recv()
            except (EOFError, OSError):  # closed, reset or broken: the worker is gone
                dead = True
                break
            if kind == "done":
                self._done(slot, payload)
            else:
                reason = payload.strip().splitlines()[-1]
                log.debug("worker traceback:\n%s", payload)
        if reason is None and not dead:
            return True
        slot.conn.close()
        slot.proc.join(timeout=10)
        if slot.proc.is_alive():
            slot.proc.terminate()
        reason = reason or f"worker process died (exit code {slot.proc.exitcode})"
        self._failed(sorted(slot.episodes), reason)
        slot.episodes.clear()
        slot.gone = True
        return False

    def _done(self, slot: _Slot, record: EpisodeRecord) -> None:
        slot.episodes.discard(record.episode)
        record.attempts = self.attempts[record.episode]
        self.records[record.episode] = record
        if self.on_record is not None:
            self.on_record(record)
        self.successes += record.success
        self.bar.update(1)
        self.bar.set_postfix(success=f"{self.successes}/{self.bar.n}")

    def _failed(self, episodes: list[int], reason: str) -> None:
        for e in episodes:
            seed, attempts = self.seeds[e], self.attempts[e]
            if attempts <= self.retries:
                log.warning("episode %d (seed %d) failed, retrying: %s", e, seed, reason)
                self.retry.append(e)
                continue
            log.error("episode %d (seed %d) failed %d times: %s", e, seed, attempts, reason)
            self.records[e] = EpisodeRecord(e, seed, status="error", attempts=attempts, error=reason)
            if self.on_record is not None:
                self.on_record(self.records[e])
            self.bar.update(1)


def plan(episodes: int, workers: int, per_worker: int) -> tuple[int, int]:
    """(worker processes, episodes per worker) for ``episodes``: at most ``workers`` processes
    holding at most ``per_worker`` episodes each, spread so that few episodes still use every
    worker (8 episodes, 2 workers, 8 per worker: 2 workers of 4)."""
    per = max(1, min(per_worker, -(-episodes // max(1, workers))))
    return max(1, min(workers, -(-episodes // per))), per


def run_in_workers(
    factory: EpisodeFactory,
    seeds: list[int],
    workers: int,
    retries: int = 1,
    desc: str = "episodes",
    progress: bool = True,
    per_worker: int = 1,
    on_record: Callable[[EpisodeRecord], None] | None = None,
    finished: dict[int, EpisodeRecord] | None = None,
) -> list[EpisodeRecord]:
    """Run one episode per seed in up to ``workers`` spawned processes holding up to
    ``per_worker`` episodes each (see :func:`plan`); records in seed order. ``on_record`` is
    called with each final record; the episodes in ``finished`` (index -> record) are not run."""
    finished = finished or {}
    n, per = plan(len(seeds) - len(finished), workers, per_worker)
    bar = tqdm(total=len(seeds), initial=len(finished), desc=desc, unit="ep", disable=not progress)
    pool = _Pool(factory, seeds, per, retries, bar, on_record, finished)
    slots = [pool.start() for _ in range(n if pool.todo else 0)]
    try:
        for slot in slots:
            pool.fill(slot)
        while busy := [s for s in slots if s.episodes]:
            wait([s.conn for s in busy] + [s.proc.sentinel for s in busy])
            for slot in busy:
                pool.collect(slot)
            for i, slot in enumerate(slots):
                if slot.gone and (pool.todo or pool.retry):
                    slots[i] = slot = pool.start()  # a fresh worker for the retries and what is left
                if not slot.gone:
                    pool.fill(slot)
    finally:
        for slot in slots:
            with contextlib.suppress(OSError):  # a dead worker's pipe is already closed
                if not slot.gone:
                    slot.conn.send(None)
        for slot in slots:
            slot.proc.join(timeout=10)
            if slot.proc.is_alive():
                slot.proc.terminate()
        bar.close()
    return [r for r in pool.records if r is not None]
