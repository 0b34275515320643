"""Episodes on Ray (eval.ray_workers): the process pool's records, retries from Ray's fault tolerance."""

from pathlib import Path

import pytest
import ray
from difftori.eval.ray_workers import run_on_ray
from difftori.eval.results import EvalResult
from difftori.eval.workers import run_in_workers
from eval_helpers import FlakyEpisodes

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (run_on_ray uses an initialised Ray as it is); its
    workers import the tests' helpers."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": TESTS}})
    yield
    ray.shutdown()


@pytest.mark.parametrize("per_worker", [1, 3])
def test_ray_retries_a_crash_and_records_repeated_failures(local_ray, tmp_path, per_worker):
    """Seed 4 kills its worker once, 5 always raises, 7 always kills: the pool's outcomes."""
    seeds = [2, 3, 4, 5, 6, 7]
    factory = FlakyEpisodes(
        str(tmp_path), crash_once=(4,), raise_always=(5,), die_always=(7,), capacity=per_worker
    )
    seen = []
    records = run_on_ray(factory, seeds, 2, 1, progress=False, per_worker=per_worker, on_record=seen.append)
    by_seed = {r.env_seed: r for r in records}
    assert [r.env_seed for r in records] == seeds and sorted(r.episode for r in seen) == list(range(6))
    assert by_seed[4].status == "ok" and by_seed[4].success  # retried (by Ray, or alone)
    assert by_seed[5].status == "error" and by_seed[5].attempts == 2 and "cursed" in by_seed[5].error
    assert by_seed[7].status == "error" and by_seed[7].attempts == 2 and "died" in by_seed[7].error
    assert [by_seed[s].success for s in (2, 3, 6)] == [True, False, True]
    assert all(by_seed[s].status == "ok" for s in (2, 3, 6))  # batch-mates of a crash are not lost
    # a failed chunk's episodes are each submitted alone once more; Ray's own retries are not seen
    assert [by_seed[s].attempts for s in (2, 3, 4, 6)] == ([1] * 4 if per_worker == 1 else [2] * 4)
    s = EvalResult("metaworld", "t", "dp3", "none", 0, "DP3", episodes=records).summary()
    assert (s["n"], s["successes"], s["errors"]) == (4, 3, 2)


def test_ray_gives_the_pools_records_and_skips_finished_episodes(local_ray, tmp_path):
    seeds = list(range(10, 23))  # episodes last 1-3 control steps: chunks finish out of order
    factory = FlakyEpisodes(str(tmp_path), capacity=4)
    pool = run_in_workers(factory, seeds, workers=2, per_worker=4, progress=False)
    finished = {e: pool[e] for e in (0, 5)}
    on_ray = run_on_ray(factory, seeds, 2, per_worker=4, progress=False, finished=finished)
    assert on_ray == pool and all(r.status == "ok" and r.attempts == 1 for r in on_ray)
    assert on_ray[0] is finished[0]  # kept, not run again
