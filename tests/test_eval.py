"""Evaluation pieces: Wilson intervals, the chunk/history wrapper, the worker pool, results files,
report aggregation, and the command line's errors."""

import csv
import json

import gymnasium as gym
import numpy as np
import pytest
from difftori.eval.evaluate import episode_seeds
from difftori.eval.multistep import MultiStepWrapper
from difftori.eval.report import aggregate, write_report
from difftori.eval.results import EpisodeRecord, EvalResult, ResultsError, wilson_interval
from difftori.eval.workers import plan, run_in_workers
from difftori.pipeline.cli import main
from eval_helpers import FlakyEpisodes


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [  # Wilson score intervals, z = 1.96 (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001)
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_episode_seeds_are_reproducible_and_avoid_demo_seeds():
    a = episode_seeds(100, 20)
    assert a == episode_seeds(100, 20) and len(set(a)) == 20
    assert episode_seeds(101, 20) != a
    b = episode_seeds(100, 20, exclude={a[3]})
    assert a[3] not in b and b[:3] == a[:3]


class Counter(gym.Env):
    """obs = step count; succeeds when the action sum reaches 5; truncates after 8 steps."""

    observation_space = gym.spaces.Dict({"t": gym.spaces.Box(0, 100, (1,), np.float32)})
    action_space = gym.spaces.Box(-10, 10, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        self.t, self.total = 0, 0.0
        return {"t": np.array([0.0], np.float32)}, {}

    def step(self, action):
        self.t += 1
        self.total += float(action[0])
        success = self.total >= 5
        obs = {"t": np.array([self.t], np.float32)}
        return obs, 1.0, success, self.t >= 8 and not success, {"success": success}


def test_multistep_wrapper_history_and_chunks():
    env = MultiStepWrapper(Counter(), n_obs_steps=2)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs["t"][:, 0], [0, 0])  # first frame repeated
    obs, reward, term, trunc, info = env.step(np.array([[1.0], [1.0], [1.0]]))
    np.testing.assert_array_equal(obs["t"][:, 0], [2, 3])
    assert (reward, term, trunc, info["steps"], info["success"]) == (3.0, False, False, 3, False)
    obs, reward, term, trunc, info = env.step(np.array([[1.0], [1.0], [1.0]]))  # succeeds at step 5
    assert (reward, term, info["steps"], info["success"]) == (2.0, True, 2, True)
    np.testing.assert_array_equal(obs["t"][:, 0], [4, 5])
    env.reset()
    _, _, term, trunc, info = env.step(np.zeros((10, 1)))  # the step limit stops the chunk
    assert (term, trunc, info["steps"]) == (False, True, 8)
    with pytest.raises(ValueError, match="chunk"):
        env.step(np.zeros(1))


@pytest.mark.parametrize("per_worker", [1, 3])
def test_workers_retry_a_crash_once_and_record_repeated_failures(tmp_path, per_worker):
    """A crash fails every episode its worker held; each is retried once, alone, on a fresh worker."""
    seeds = [2, 3, 4, 5, 6, 7]
    factory = FlakyEpisodes(
        str(tmp_path), crash_once=(4,), raise_always=(5,), die_always=(7,), capacity=per_worker
    )
    records = run_in_workers(factory, seeds, workers=2, retries=1, progress=False, per_worker=per_worker)
    by_seed = {r.env_seed: r for r in records}
    assert [r.env_seed for r in records] == seeds  # in seed order
    assert by_seed[4].status == "ok" and by_seed[4].attempts == 2 and by_seed[4].success
    assert by_seed[5].status == "error" and by_seed[5].attempts == 2 and "cursed" in by_seed[5].error
    assert by_seed[7].status == "error" and "exit code 4" in by_seed[7].error
    assert [by_seed[s].success for s in (2, 3, 6)] == [True, False, True]
    assert all(by_seed[s].status == "ok" for s in (2, 3, 6))  # batch-mates of a crash are not lost
    # batch-mates of a crash count its attempt: with 3 per worker, seeds 2-4 and 5-7 shared workers
    assert [by_seed[s].attempts for s in (2, 3, 6)] == ([1, 1, 1] if per_worker == 1 else [2, 2, 2])
    result = EvalResult("metaworld", "t", "dp3", "none", 0, "DP3", episodes=records)
    s = result.summary()
    assert (s["n"], s["successes"], s["errors"]) == (4, 3, 2)  # errors are not failures


def test_workers_refill_their_envs_and_keep_seed_order(tmp_path):
    seeds = list(range(10, 23))  # episodes last 1-3 control steps, so they finish out of order
    records = run_in_workers(
        FlakyEpisodes(str(tmp_path), capacity=4), seeds, workers=2, per_worker=4, progress=False
    )
    assert [r.env_seed for r in records] == seeds and [r.episode for r in records] == list(range(13))
    assert all(r.status == "ok" and r.attempts == 1 for r in records)
    assert plan(13, 2, 4) == (2, 4) and plan(8, 2, 8) == (2, 4) and plan(3, 4, 8) == (3, 1)


def _result(suite, task, method, refiner, seed, successes, n=10):
    eps = [EpisodeRecord(i, 1000 + i, success=i < successes, steps=10) for i in range(n)]
    metric = "failure" if suite == "robomimic" else "success"  # what each suite's results record
    return EvalResult(suite, task, "dp3", refiner, seed, method, metric=metric, episodes=eps)


def _write(root, results):
    for r in results:
        r.write(root / r.task / r.base / r.refiner / f"seed{r.seed}.json")


def test_report_aggregates_over_seeds(tmp_path):
    results = [
        _result("metaworld", "sweep", "DP3", "none", 0, 6),
        _result("metaworld", "sweep", "DP3", "none", 1, 8),
        _result("metaworld", "sweep", "DiffTORI + DP3", "difftori", 0, 9),
        _result("metaworld", "sweep", "DiffTORI + DP3", "difftori", 1, 9),
        _result("metaworld", "sweep-into", "DP3", "none", 0, 2),
        _result("metaworld", "sweep-into", "DP3", "none", 1, 4),
        _result("metaworld", "sweep-into", "DiffTORI + DP3", "difftori", 0, 1),
        _result("metaworld", "sweep-into", "DiffTORI + DP3", "difftori", 1, 2),
        _result("robomimic", "lift", "DP3", "none", 0, 7),
    ]
    _write(tmp_path / "evals", results)
    tables = write_report(tmp_path / "evals", tmp_path / "tables", tmp_path / "plots", tmp_path / "m.json")
    mw, rm = tables
    assert (mw.suite, mw.metric, rm.suite, rm.metric) == ("metaworld", "success", "robomimic", "failure")
    assert mw.methods == ["DP3", "DiffTORI + DP3"]  # base first
    cell = mw.cells[("DP3", "sweep")]
    assert (cell.mean, cell.std) == pytest.approx((70.0, 10.0))  # rates 60, 80
    assert mw.cells[("DiffTORI + DP3", "sweep-into")].mean == pytest.approx(15.0)
    assert mw.average("DP3") == pytest.approx((70 + 30) / 2)
    assert mw.average("DiffTORI + DP3") == pytest.approx((90 + 15) / 2)
    assert rm.cells[("DP3", "lift")].mean == pytest.approx(30.0)  # failure rate = 1 - 7/10

    md = (tmp_path / "tables" / "success.md").read_text()
    assert "| DP3 | 70.0 ± 10.0 | **30.0 ± 10.0** | 50.0 |" in md
    assert "| DiffTORI + DP3 | **90.0 ± 0.0** | 15.0 ± 5.0 | **52.5** |" in md
    rows = list(csv.DictReader((tmp_path / "tables" / "success.csv").open()))
    row = next(r for r in rows if r["method"] == "DP3" and r["task"] == "sweep")
    assert (float(row["mean"]), float(row["std"]), int(row["seeds"]), int(row["episodes"])) == (70, 10, 2, 20)
    assert "\\textbf{52.5}" in (tmp_path / "tables" / "success.tex").read_text()
    assert (tmp_path / "tables" / "failure.md").exists()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["metaworld"]["average"]["DP3"] == 50.0
    assert (tmp_path / "plots" / "rates.png").stat().st_size > 1000


def test_report_rejects_duplicates():
    a = _result("metaworld", "sweep", "DP3", "none", 0, 6)
    with pytest.raises(ResultsError, match="duplicates"):
        aggregate([("a.json", a), ("b.json", a)])


def test_corrupt_results_file_is_named_and_nothing_is_written(tmp_path, caplog):
    _write(tmp_path / "evals", [_result("metaworld", "sweep", "DP3", "none", 0, 6)])
    bad = tmp_path / "evals" / "sweep" / "dp3" / "difftori" / "seed0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"format": "difftori-eval", "version": 1, "suite": "metaworld", "task": ')
    args = ["report", "--results", str(tmp_path / "evals"), "--tables", str(tmp_path / "tables")]
    args += ["--plots", str(tmp_path / "plots"), "--metrics", str(tmp_path / "m.json")]
    assert main(args) == 1
    assert str(bad) in caplog.text and "not valid JSON" in caplog.text
    assert not (tmp_path / "tables").exists() and not (tmp_path / "m.json").exists()
    bad.write_text(json.dumps({"format": "difftori-eval", "version": 1, "suite": "metaworld"}))
    assert main(args) == 1
    assert "key 'task'" in caplog.text
    with pytest.raises(ResultsError, match="no results files"):
        write_report(tmp_path / "nothing", tmp_path / "t", tmp_path / "p", tmp_path / "m.json")
