"""Episodes in worker processes: one simulator per process (spawn start method), retries on crashes.

``run_in_workers(factory, seeds, workers)`` starts ``workers`` processes with the ``spawn`` start
method (rendering contexts and simulators never share or inherit a process). Each calls
``factory()`` once to build its episode function ``run(episode, seed) -> EpisodeRecord``, then runs
the episodes the parent assigns to it, one at a time, over its own pipe. The parent always knows
which episode each worker runs, so when a worker raises or its process dies (segfault, OOM kill),
exactly that episode is retried once on a fresh worker; a second failure is recorded as
``status="error"`` with the reason, never as a task failure.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from difftori.eval.results import EpisodeRecord
from tqdm import tqdm

log = logging.getLogger(__name__)
EpisodeFn = Callable[[int, int], EpisodeRecord]  # (episode index, env seed) -> record


class EpisodeFactory(Protocol):
    """Picklable; called once in each worker to build that worker's env and policy."""

    def __call__(self) -> EpisodeFn: ...


def _worker(factory: EpisodeFactory, conn: Connection) -> None:
    run: EpisodeFn | None = None
    while (job := conn.recv()) is not None:
        episode, seed = job
        try:
            run = run or factory()
            conn.send((episode, "done", run(episode, seed)))
        except Exception:  # reported to the parent, which retries or records the error
            conn.send((episode, "error", traceback.format_exc(limit=5)))


@dataclass
class _Slot:
    proc: Any
    conn: Connection  # the parent's end of this worker's own pipe (a dying worker poisons nothing else)
    episode: int | None = None


def run_in_workers(
    factory: EpisodeFactory,
    seeds: list[int],
    workers: int,
    retries: int = 1,
    desc: str = "episodes",
    progress: bool = True,
) -> list[EpisodeRecord]:
    """Run one episode per seed in ``workers`` spawned processes; records in seed order."""
    ctx = mp.get_context("spawn")
    todo: deque[int] = deque(range(len(seeds)))
    attempts = [0] * len(seeds)
    records: list[EpisodeRecord | None] = [None] * len(seeds)
    bar = tqdm(total=len(seeds), desc=desc, unit="ep", disable=not progress)
    successes = 0

    def start() -> _Slot:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(factory, child), daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def assign(slot: _Slot) -> None:
        slot.episode = todo.popleft() if todo else None
        if slot.episode is not None:
            attempts[slot.episode] += 1
            slot.conn.send((slot.episode, seeds[slot.episode]))

    def failed(episode: int, reason: str) -> None:
        if attempts[episode] <= retries:
            log.warning("episode %d (seed %d) failed, retrying: %s", episode, seeds[episode], reason)
            todo.appendleft(episode)
            return
        log.error(
            "episode %d (seed %d) failed %d times: %s", episode, seeds[episode], attempts[episode], reason
        )
        records[episode] = EpisodeRecord(
            episode, seeds[episode], status="error", attempts=attempts[episode], error=reason
        )
        bar.update(1)

    slots = [start() for _ in range(max(1, min(workers, len(seeds))))]
    try:
        for slot in slots:
            assign(slot)
        while any(s.episode is not None for s in slots):
            busy = [s for s in slots if s.episode is not None]
            wait([s.conn for s in busy] + [s.proc.sentinel for s in busy])
            for i, slot in enumerate(slots):
                if slot.episode is None:
                    continue
                episode = slot.episode
                if slot.conn.poll():
                    try:
                        _, kind, payload = slot.conn.recv()
                    except EOFError:
                        kind, payload = "died", None
                elif not slot.proc.is_alive():
                    kind, payload = "died", None
                else:
                    continue
                if kind == "done":
                    payload.attempts = attempts[episode]
                    records[episode] = payload
                    successes += payload.success
                    bar.update(1)
                    bar.set_postfix(success=f"{successes}/{bar.n}")
                elif kind == "error":
                    failed(episode, payload.strip().splitlines()[-1])
                    log.debug("worker traceback:\n%s", payload)
                else:
                    slot.proc.join()
                    failed(episode, f"worker process died (exit code {slot.proc.exitcode})")
                    slot.conn.close()
                    slots[i] = slot = start()
                assign(slot)
            for slot in slots:  # an idle worker picks up a retried episode
                if slot.episode is None and todo:
                    assign(slot)
    finally:
        for slot in slots:
            with contextlib.suppress(OSError):  # a dead worker's pipe is already closed
                slot.conn.send(None)
        for slot in slots:
            slot.proc.join(timeout=10)
            if slot.proc.is_alive():
                slot.proc.terminate()
        bar.close()
    return [r for r in records if r is not None]
