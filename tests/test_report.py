"""The report's paired comparisons of each refined method with its base: tables, CSV, metrics."""

import csv
import json
import logging

import pytest
from difftori.eval.report import aggregate, render_latex, render_markdown, write_report
from difftori.eval.results import EpisodeRecord, EvalResult, ResultsError
from test_report_stats import mcnemar_reference, newcombe10_reference


def _result(suite, task, method, refiner, seed, outcomes, env_seeds=None, errors=()):
    """``outcomes``: "1" success, "0" failure per episode; ``errors``: env seeds that errored."""
    env_seeds = env_seeds or range(1000, 1000 + len(outcomes))
    eps = [
        EpisodeRecord(i, s, status="error" if s in errors else "ok", success=o == "1", steps=5)
        for i, (s, o) in enumerate(zip(env_seeds, outcomes, strict=True))
    ]
    metric = "failure" if suite == "robomimic" else "success"  # what each suite's results record
    return EvalResult(suite, task, "dp3", refiner, seed, method, metric=metric, episodes=eps)


BASE, IBC, DIFFTORI = "DP3", "IBC + DP3", "DiffTORI + DP3"
# sweep: DiffTORI a, b, c, d = 8, 6, 2, 4 (14/20 vs 10/20); IBC 10, 9, 0, 1 (19/20)
# sweep-into: DiffTORI identical to the base (5/10); IBC 0, 0, 5, 5 (0/10)
RESULTS = [
    _result("metaworld", "sweep", BASE, "none", 0, "11111111110000000000"),
    _result("metaworld", "sweep", DIFFTORI, "difftori", 0, "11111111001111110000"),
    _result("metaworld", "sweep", IBC, "ibc", 0, "11111111111111111110"),
    _result("metaworld", "sweep-into", BASE, "none", 0, "1111100000"),
    _result("metaworld", "sweep-into", DIFFTORI, "difftori", 0, "1111100000"),
    _result("metaworld", "sweep-into", IBC, "ibc", 0, "0000000000"),
]


def _cell(a, b, c, d):
    lo, hi = newcombe10_reference(a, b, c, d)
    p = mcnemar_reference(b, c)
    return 100 * (b - c) / (a + b + c + d), 100 * lo, 100 * hi, p


def test_paired_values_tables_csv_and_metrics(tmp_path):
    for r in RESULTS:
        r.write(tmp_path / "evals" / r.task / r.base / r.refiner / f"seed{r.seed}.json")
    write_report(tmp_path / "evals", tmp_path / "tables", tmp_path / "plots", tmp_path / "m.json")
    expected = {  # (method, task) -> 2x2 (a, b, c, d): method and base both / method only / ...
        (DIFFTORI, "sweep"): (8, 6, 2, 4),
        (DIFFTORI, "sweep-into"): (5, 0, 0, 5),
        (DIFFTORI, "All tasks"): (13, 6, 2, 9),
        (IBC, "sweep"): (10, 9, 0, 1),
        (IBC, "sweep-into"): (0, 0, 5, 5),
        (IBC, "All tasks"): (10, 9, 5, 6),
    }
    rows = list(csv.DictReader((tmp_path / "tables" / "success_paired.csv").open()))
    assert [(r["method"], r["task"]) for r in rows] == list(expected)[3:] + list(expected)[:3]  # IBC first
    metrics = json.loads((tmp_path / "m.json").read_text())["metaworld"]
    for row in rows:
        a, b, c, d = expected[(row["method"], row["task"])]
        diff, lo, hi, p = _cell(a, b, c, d)
        assert (row["suite"], row["metric"], row["base_method"]) == ("metaworld", "success", BASE)
        assert int(row["pairs"]) == a + b + c + d
        assert float(row["base_rate"]) == pytest.approx(100 * (a + c) / (a + b + c + d), abs=0.005)
        assert float(row["method_rate"]) == pytest.approx(100 * (a + b) / (a + b + c + d), abs=0.005)
        got = [float(row[k]) for k in ("diff_points", "ci_low", "ci_high", "mcnemar_p")]
        assert got == pytest.approx([diff, lo, hi, p], abs=0.005)
        assert (int(row["discordant_method_only"]), int(row["discordant_base_only"])) == (b, c)
        assert row["significant"] == str(p < 0.05).lower()
        m = metrics["paired"]["all_tasks" if row["task"] == "All tasks" else row["task"]][row["method"]]
        assert m["pairs"] == a + b + c + d
        assert [m["diff_points"], *m["ci95"], m["p_value"]] == pytest.approx([diff, lo, hi, p], abs=0.005)
    assert (metrics["sweep"], metrics["average"]) == (  # the existing keys are unchanged
        {BASE: 50.0, IBC: 95.0, DIFFTORI: 70.0},
        {BASE: 50.0, IBC: 47.5, DIFFTORI: 60.0},
    )
    assert BASE not in metrics["paired"]["sweep"]

    md = (tmp_path / "tables" / "success.md").read_text()
    assert "| Method | sweep | sweep-into | All tasks |" in md
    # (10, 9, 0, 1): +45.0 [17.6, 65.5], p = 2 / 2^9; (0, 0, 5, 5): p = 2 / 2^5
    assert "| IBC + DP3 | +45.0 [17.6, 65.5] p=0.004 | -50.0 [-76.3, -11.7] p=0.06 | " in md
    # (8, 6, 2, 4): p = 74 / 256; (5, 0, 0, 5): no discordant pair, p = 1, symmetric interval
    assert "| DiffTORI + DP3 | +20.0 [-8.0, 44.0] p=0.29 | +0.0 [-16.7, 16.7] p=1.00 | " in md
    assert "| DP3 | 50.0 | **50.0** | 50.0 |" in md  # the success table is unchanged
    assert "| DP3 | +" not in md and "| DP3 | -" not in md  # the base has no paired row
    line = "Significant at p < 0.05 (not corrected for multiple comparisons): IBC + DP3 on sweep (+45.0)."
    assert line in md.splitlines()
    tex = (tmp_path / "tables" / "success.tex").read_text()
    assert "IBC + DP3 & $+45.0$ $[17.6, 65.5]$ $p=0.004$ & $-50.0$ $[-76.3, -11.7]$ $p=0.06$ & " in tex
    assert "Newcombe 95\\% CI; exact McNemar p" in tex and "p $<$ 0.05" in tex


def test_no_significant_difference_line():
    tables = aggregate([("x", r) for r in RESULTS if r.task == "sweep-into" or r.method != IBC])
    md = render_markdown(tables)
    assert "No difference is significant at p < 0.05." in md.splitlines()
    assert "No difference is significant at p $<$ 0.05." in render_latex(tables)


def test_pairs_pool_training_seeds_skip_errors_and_mismatched_seeds(caplog):
    seeds = list(range(1000, 1010))
    results = [
        _result("metaworld", "push", BASE, "none", 0, "1111100000"),
        _result("metaworld", "push", DIFFTORI, "difftori", 0, "1111111000"),  # 5, 2, 0, 3
        # seed 1: the refined run shares 8 env seeds; 1003 errored in the base, 1004 in the method
        _result("metaworld", "push", BASE, "none", 1, "1111100000", seeds, errors=(1003,)),
        _result("metaworld", "push", DIFFTORI, "difftori", 1, "0011111111", [s + 2 for s in seeds], (1004,)),
    ]
    with caplog.at_level(logging.WARNING):
        (table,) = aggregate([(f"r{i}", r) for i, r in enumerate(results)])
    assert "DiffTORI + DP3 on push, training seed 1: env seeds differ" in caplog.text
    assert "pairing the 8 common ones" in caplog.text
    assert caplog.text.count("env seeds differ") == 1
    # seed 1 pairs: env seeds 1002 (base 1, method 0) and 1005..1009 (base 0, method 1): 0, 5, 1, 0
    pc = table.paired[(DIFFTORI, "push")]
    assert (pc.table.both, pc.table.method_only, pc.table.base_only, pc.table.neither) == (5, 7, 1, 3)
    assert pc.base_method == BASE and table.paired[(DIFFTORI, "All tasks")].table == pc.table


def test_failure_metric_and_missing_base(caplog):
    results = [
        _result("robomimic", "lift", BASE, "none", 0, "1111111000"),  # 3 failures
        _result("robomimic", "lift", IBC, "ibc", 0, "1110000000"),  # 7 failures: 3, 4, 0, 3
        _result("robomimic", "can", BASE, "none", 1, "1111111111"),  # another training seed
        _result("robomimic", "can", IBC, "ibc", 0, "1111111111"),
    ]
    with caplog.at_level(logging.WARNING):
        (table,) = aggregate([(f"r{i}", r) for i, r in enumerate(results)])
    assert "IBC + DP3 on can, training seed 0: no result of its base 'dp3' (refiner none)" in caplog.text
    assert (IBC, "can") not in table.paired
    pc = table.paired[(IBC, "lift")]
    assert pc.diff == pytest.approx(40.0)  # failure-rate points: more failures = positive
    assert pc.interval == pytest.approx([100 * v for v in newcombe10_reference(3, 4, 0, 3)])
    md = render_markdown([table])
    assert "failure rate of the method minus that of its base (negative = better)" in md
    assert "| IBC + DP3 | - | +40.0 [1.4, 64.5] p=0.12 | +40.0 [1.4, 64.5] p=0.12 |" in md


def test_results_disagreeing_on_a_suites_metric_are_refused():
    results = [
        _result("robomimic", "lift", BASE, "none", 0, "1110"),
        _result("robomimic", "can", BASE, "none", 0, "1110"),
    ]
    results[1].metric = "success"
    with pytest.raises(ResultsError, match=r"r1: key 'metric': 'success', but r0 has 'failure'"):
        aggregate([(f"r{i}", r) for i, r in enumerate(results)])


def test_version_1_results_read_as_success_rates(tmp_path):
    """Files written before results recorded the suite's metric were all MetaWorld's."""
    d = _result("metaworld", "sweep", BASE, "none", 0, "10").to_dict()
    d["version"] = 1
    del d["metric"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert EvalResult.read(tmp_path / "old.json").metric == "success"
    d["version"], d["metric"] = 2, "rate"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ResultsError, match="bad.json: key 'metric': expected one of"):
        EvalResult.read(tmp_path / "bad.json")
