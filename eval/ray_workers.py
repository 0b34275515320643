"""Episodes as Ray tasks: the process pool's contract (:mod:`difftori.eval.workers`) on Ray.

``run_on_ray`` takes the same arguments as :func:`~difftori.eval.workers.run_in_workers` and
gives the same records. Each Ray task runs one *chunk*: up to ``per_worker`` episodes advanced
together in one :class:`~difftori.eval.workers.EpisodeBatch`. A Ray worker process builds its batch
(its envs and policy) on its first chunk of an evaluation and keeps it for the next ones.

Retries come from Ray's fault tolerance. A chunk of one episode is submitted with
``max_retries=retries`` and ``retry_exceptions=True``: Ray runs it again if its worker raises or
dies, on a live worker, and a last failure is recorded as ``status="error"`` with Ray's reason. A
chunk of several episodes is submitted once; if it fails, each of its episodes is submitted alone
with one retry fewer. An episode that brings its worker down then cannot take its batch-mates
with it, as in the process pool. ``attempts`` counts the submissions made here: Ray does not tell
a task that it is a re-execution, so a retry done inside Ray that then succeeds is not counted.

Where it runs: with no ``address`` a local Ray instance of ``workers`` CPUs is started (no
dashboard) and shut down at the end. With ``address`` (``evaluate.ray_address``, or ``RAY_ADDRESS``
in the environment) it connects to that running cluster and leaves it running. Every task runs in
the caller's working directory with the caller's rendering and thread settings
(:data:`FORWARDED_ENV`), so the cluster's nodes must see this repository at the same path (a
shared file system) and have the same install.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from difftori.eval.results import EpisodeRecord
from difftori.eval.workers import EpisodeBatch, EpisodeFactory
from tqdm import tqdm

log = logging.getLogger(__name__)
FORWARDED_ENV = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VK_ICD_FILENAMES")
_batch: tuple[str, EpisodeBatch] | None = None  # this Ray worker's batch: (evaluation token, batch)


def _run_chunk(
    factory: EpisodeFactory, token: str, cwd: str, jobs: list[tuple[int, int]]
) -> list[EpisodeRecord]:
    """In a Ray worker: run the episodes ``jobs`` ((episode, seed)) together; their records."""
    global _batch
    if _batch is None or _batch[0] != token:
        _batch = None  # the previous evaluation's envs go first
        os.chdir(cwd)
        _batch = (token, factory())
    batch = _batch[1]
    try:
        for episode, seed in jobs:
            batch.start(episode, seed)
        records: list[EpisodeRecord] = []
        while batch.running:
            records += batch.advance()
    except BaseException:
        _batch = None  # a batch that raised mid-episode is rebuilt for the next chunk
        raise
    return records


@contextlib.contextmanager
def ray_session(workers: int, address: str | None) -> Iterator[Any]:
    """``ray``, initialised: connected to ``address``, or a local instance of ``workers`` CPUs
    (shut down on exit). An already initialised Ray is used as it is."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a laptop
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, configure_logging=False)
    else:
        ray.init(
            num_cpus=workers, include_dashboard=False, runtime_env={"env_vars": env}, configure_logging=False
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def _reason(err: Exception) -> str:
    """One line for a record's ``error``: the task's exception, or why Ray lost its worker."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if type(err).__name__.startswith("RayTaskError") else lines[0]


class _Chunks:
    """The driver's bookkeeping: chunks in flight, their attempts, the records as they arrive."""

    def __init__(self, ray: Any, factory: EpisodeFactory, seeds: list[int], retries: int) -> None:
        self.ray, self.factory, self.seeds, self.retries = ray, factory, seeds, retries
        self.task = ray.remote(_run_chunk)
        self.token, self.cwd = uuid.uuid4().hex, os.getcwd()
        self.flight: dict[Any, tuple[list[int], int]] = {}  # object ref -> (episodes, Ray's retries)
        self.attempts = [0] * len(seeds)

    def submit(self, episodes: list[int], ray_retries: int) -> None:
        for e in episodes:
            self.attempts[e] += 1
        jobs = [(e, self.seeds[e]) for e in episodes]
        task = self.task.options(num_cpus=1, max_retries=ray_retries, retry_exceptions=ray_retries > 0)
        self.flight[task.remote(self.factory, self.token, self.cwd, jobs)] = (episodes, ray_retries)

    def next_records(self) -> list[EpisodeRecord]:
        """Wait for one chunk: its records, or (failed) resubmissions and error records."""
        [ref], _ = self.ray.wait(list(self.flight), num_returns=1)
        episodes, ray_retries = self.flight.pop(ref)
        try:
            records = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            for e in episodes:  # a task that failed for good used all of Ray's retries
                self.attempts[e] += ray_retries
            return self._failed(episodes, _reason(err))
        for r in records:
            r.attempts = self.attempts[r.episode]
        return records

    def _failed(self, episodes: list[int], reason: str) -> list[EpisodeRecord]:
        left = self.retries - self.attempts[episodes[0]] + 1  # tries left to each of these episodes
        if len(episodes) > 1 and left > 0:
            log.warning("episodes %s failed together, retrying each alone: %s", episodes, reason)
            for e in episodes:
                self.submit([e], left - 1)
            return []
        out = []
        for e in episodes:
            log.error("episode %d (seed %d) failed: %s", e, self.seeds[e], reason)
            out.append(
                EpisodeRecord(e, self.seeds[e], status="error", attempts=self.attempts[e], error=reason)
            )
        return out


def run_on_ray(
    factory: EpisodeFactory,
    seeds: list[int],
    workers: int,
    retries: int = 1,
    desc: str = "episodes",
    progress: bool = True,
    per_worker: int = 1,
    on_record: Callable[[EpisodeRecord], None] | None = None,
    finished: dict[int, EpisodeRecord] | None = None,
    address: str | None = None,
) -> list[EpisodeRecord]:
    """:func:`~difftori.eval.workers.run_in_workers` on Ray (local, or the cluster at ``address``):
    one episode per seed, records in seed order; ``finished`` episodes are kept and not run."""
    records = dict(finished or {})
    todo = [e for e in range(len(seeds)) if e not in records]
    bar = tqdm(total=len(seeds), initial=len(records), desc=desc, unit="ep", disable=not progress)
    successes = sum(r.success for r in records.values())
    try:
        with ray_session(workers, address) as ray:
            chunks = _Chunks(ray, factory, seeds, retries)
            for i in range(0, len(todo), per_worker):
                part = todo[i : i + per_worker]
                chunks.submit(part, retries if len(part) == 1 else 0)
            while chunks.flight:
                for record in chunks.next_records():
                    records[record.episode] = record
                    successes += record.success
                    if on_record is not None:
                        on_record(record)
                    bar.update(1)
                    bar.set_postfix(success=f"{successes}/{bar.n}")
    finally:
        bar.close()
    return [records[e] for e in sorted(records)]
