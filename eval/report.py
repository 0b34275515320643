"""Success/failure-rate tables (Markdown, CSV, LaTeX), plots and DVC metrics from results files.

Reads only the evaluation JSON files (:class:`~difftori.eval.results.EvalResult`). Tables are shaped
like the paper's Tables 1-3: one table per suite, rows = methods (the base alone, then each
refiner on it), columns = tasks + Average; a cell is the mean +- std (numpy's population std,
ddof=0) over training seeds of the per-seed rate in percent, and the best mean of each column is
bold. A single seed shows the mean alone. Each suite's metric comes from its results files (the
suite's own choice: a success rate, or a failure rate where lower is better). The Average column
is the mean of a method's per-task means (shown when the method has every task).

Under each table, a second one gives each refined method's paired difference to its base (the
result with the same suite, task, base policy and training seed and refiner ``none``): episodes
are paired by (task, training seed, env seed), only pairs completed by both count, and pairs are
pooled over training seeds (and, in the "All tasks" column, over tasks). Cells are the difference
in points of the table's metric (method - base) with Newcombe's method 10 paired 95% interval and
the exact McNemar p-value (:mod:`difftori.eval.stats`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from difftori.datasets.safeio import atomic_write
from difftori.eval.results import EpisodeRecord, EvalResult, ResultsError, wilson_interval
from difftori.eval.stats import PairedComparison

log = logging.getLogger(__name__)
REFINER_ORDER = ("none", "residual", "ibc", "difftori")
ALL_TASKS = "All tasks"  # the paired table's column pooling the pairs of every task
ALPHA = 0.05


@dataclass
class Cell:
    """One (method, task): per-seed rates in percent, and the pooled episodes."""

    rates: list[float]
    successes: int
    n: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.rates))

    @property
    def std(self) -> float:
        return float(np.std(self.rates))

    def interval(self, metric: str) -> tuple[float, float]:
        """Wilson 95% interval (percent) of the pooled episodes, in the table's metric."""
        lo, hi = wilson_interval(self.successes, self.n)
        return (100 * lo, 100 * hi) if metric == "success" else (100 * (1 - hi), 100 * (1 - lo))


@dataclass
class Paired:
    """One refined method against its base on one task (or all tasks): the pooled pairs."""

    base_method: str
    table: PairedComparison  # events = the table's metric (successes or failures)

    @property
    def diff(self) -> float:
        """Difference in points (method - base) of the table's metric."""
        return 100 * self.table.diff

    @property
    def interval(self) -> tuple[float, float]:
        lo, hi = self.table.interval()
        return 100 * lo, 100 * hi

    @property
    def p_value(self) -> float:
        return self.table.p_value

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


@dataclass
class Table:
    suite: str
    metric: str  # "success" or "failure"
    tasks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    refined: list[str] = field(default_factory=list)  # methods with a refiner (not the base alone)
    paired: dict[tuple[str, str], Paired] = field(default_factory=dict)  # (method, task|ALL_TASKS)

    def average(self, method: str) -> float | None:
        means = [self.cells[(method, t)].mean for t in self.tasks if (method, t) in self.cells]
        return float(np.mean(means)) if len(means) == len(self.tasks) else None

    def best(self, column: list[float | None]) -> float | None:
        values = [v for v in column if v is not None]
        if not values:
            return None
        return max(values) if self.metric == "success" else min(values)


def find_results(root: Path) -> list[Path]:
    """Every results file (``seed*.json``) under ``root``."""
    files = sorted(root.rglob("seed*.json"))
    if not files:
        raise ResultsError(f"{root}: no results files (seed*.json) found")
    return files


def aggregate(results: list[tuple[Path, EvalResult]]) -> list[Table]:
    """Group results into one table per suite; a duplicate (task, method, seed) is an error."""
    seen: dict[tuple[str, str, str, int], Path] = {}
    per_cell: dict[tuple[str, str, str], list[EvalResult]] = defaultdict(list)
    order: dict[tuple[str, str], tuple[str, int]] = {}
    metrics: dict[str, tuple[str, Path]] = {}
    for path, r in results:
        metric, first = metrics.setdefault(r.suite, (r.metric, path))
        if r.metric != metric:
            raise ResultsError(f"{path}: key 'metric': {r.metric!r}, but {first} has {metric!r} ({r.suite})")
        key = (r.suite, r.task, r.method, r.seed)
        if key in seen:
            raise ResultsError(f"{path}: duplicates {seen[key]} (suite, task, method, seed = {key})")
        seen[key] = path
        if not r.completed:
            raise ResultsError(
                f"{path}: key 'episodes': no episode completed (all {len(r.episodes)} errored)"
            )
        per_cell[(r.suite, r.method, r.task)].append(r)
        rank = REFINER_ORDER.index(r.refiner) if r.refiner in REFINER_ORDER else len(REFINER_ORDER)
        order[(r.suite, r.method)] = (r.base, rank)
    tables: dict[str, Table] = {}
    for (suite, method, task), rs in sorted(per_cell.items()):
        table = tables.setdefault(suite, Table(suite, metrics[suite][0]))
        summaries = [r.summary() for r in rs]
        rates = [
            100 * (s["success_rate"] if table.metric == "success" else 1 - s["success_rate"])
            for s in summaries
        ]
        table.cells[(method, task)] = Cell(
            rates, sum(s["successes"] for s in summaries), sum(s["n"] for s in summaries)
        )
        if task not in table.tasks:
            table.tasks.append(task)
        if method not in table.methods:
            table.methods.append(method)
    for table in tables.values():
        table.methods.sort(key=lambda m: (*order[(table.suite, m)], m))
        table.refined = [m for m in table.methods if order[(table.suite, m)][1] > 0]
    _add_paired(tables, [r for _, r in results])
    return [tables[s] for s in sorted(tables)]


# -- paired comparisons -----------------------------------------------------------------------------
def pair_episodes(result: EvalResult, base: EvalResult, metric: str) -> list[tuple[bool, bool]]:
    """``(method_event, base_event)`` per env seed completed in both; the event is a success or,
    for the ``failure`` metric, a failure. Env seeds in only one of the two are left out (warned)."""
    mine = {e.env_seed: e for e in result.episodes}
    theirs = {e.env_seed: e for e in base.episodes}
    common = mine.keys() & theirs.keys()
    if len(common) != len(mine) or len(common) != len(theirs):
        log.warning(
            "%s on %s, training seed %d: env seeds differ from the base's (%d vs %d episodes); "
            "pairing the %d common ones",
            result.method,
            result.task,
            result.seed,
            len(mine),
            len(theirs),
            len(common),
        )

    def event(e: EpisodeRecord) -> bool:
        return e.success if metric == "success" else not e.success

    return [
        (event(mine[s]), event(theirs[s]))
        for s in sorted(common)
        if mine[s].status == "ok" and theirs[s].status == "ok"
    ]


def _add_paired(tables: dict[str, Table], results: list[EvalResult]) -> None:
    """Fill each table's ``paired`` cells: refined results paired with their base's, per task and
    over all tasks; a refined result without a base result is left out (warned)."""
    bases = {(r.suite, r.task, r.base, r.seed): r for r in results if r.refiner == "none"}
    pairs: dict[tuple[str, str, str], list[tuple[bool, bool]]] = defaultdict(list)
    labels: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in sorted(results, key=lambda r: (r.suite, r.method, r.task, r.seed)):
        if r.refiner == "none":
            continue
        base = bases.get((r.suite, r.task, r.base, r.seed))
        if base is None:
            log.warning(
                "%s on %s, training seed %d: no result of its base %r (refiner none): not paired",
                r.method,
                r.task,
                r.seed,
                r.base,
            )
            continue
        paired = pair_episodes(r, base, tables[r.suite].metric)
        for task in (r.task, ALL_TASKS):
            pairs[(r.suite, r.method, task)] += paired
            labels[(r.suite, r.method, task)].add(base.method)
    for (suite, method, task), ps in pairs.items():
        if ps:
            base_method = " / ".join(sorted(labels[(suite, method, task)]))
            tables[suite].paired[(method, task)] = Paired(base_method, PairedComparison.from_outcomes(ps))


# -- renderers --------------------------------------------------------------------------------------
def _fmt(cell: Cell | None, bold: bool, style: str) -> str:
    if cell is None:
        return "-"
    pm = " $\\pm$ " if style == "latex" else " ± "
    text = f"{cell.mean:.1f}" + (f"{pm}{cell.std:.1f}" if len(cell.rates) > 1 else "")
    return _bold(text, style) if bold else text


def _bold(text: str, style: str) -> str:
    return f"\\textbf{{{text}}}" if style == "latex" else f"**{text}**"


def _rows(table: Table, style: str) -> list[list[str]]:
    best = {
        t: table.best([c.mean if (c := table.cells.get((m, t))) else None for m in table.methods])
        for t in table.tasks
    }
    best_avg = table.best([table.average(m) for m in table.methods])
    rows = []
    for m in table.methods:
        row = [m]
        for t in table.tasks:
            cell = table.cells.get((m, t))
            row.append(_fmt(cell, cell is not None and np.isclose(cell.mean, best[t]), style))
        avg = table.average(m)
        text = "-" if avg is None else f"{avg:.1f}"
        if avg is not None and np.isclose(avg, best_avg):
            text = _bold(text, style)
        row.append(text)
        rows.append(row)
    return rows


def _caption(table: Table) -> str:
    seeds = sorted({len(c.rates) for c in table.cells.values()})
    episodes = sorted({c.n // max(1, len(c.rates)) for c in table.cells.values()})
    what = (
        "Success rate (%, higher is better)"
        if table.metric == "success"
        else "Failure rate (%, lower is better)"
    )
    spread = (
        "one training seed" if seeds == [1] else f"mean ± std over {'/'.join(map(str, seeds))} training seeds"
    )
    return (
        f"{what} on {table.suite}: {spread}, "
        f"{'/'.join(map(str, episodes))} evaluation episodes per seed; best per column in bold."
    )


def _num(x: float, sign: bool = False) -> str:
    """One decimal, never "-0.0"."""
    text = f"{x:+.1f}" if sign else f"{x:.1f}"
    return text.replace("-0.0", "+0.0" if sign else "0.0") if text.lstrip("+-") == "0.0" else text


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def _paired_cell(pc: Paired | None, style: str) -> str:
    if pc is None:
        return "-"
    lo, hi = pc.interval
    diff, lo_s, hi_s, p = _num(pc.diff, sign=True), _num(lo), _num(hi), _p_text(pc.p_value)
    if style == "latex":
        return f"${diff}$ $[{lo_s}, {hi_s}]$ ${p}$"
    return f"{diff} [{lo_s}, {hi_s}] {p}"


def _paired_caption(table: Table) -> str:
    what = "success" if table.metric == "success" else "failure"
    sign = "positive" if table.metric == "success" else "negative"
    return (
        f"Paired difference to the base (points, Newcombe 95% CI; exact McNemar p) on {table.suite}: "
        f"{what} rate of the method minus that of its base ({sign} = better), on the same training "
        f"and env seeds, pooled over training seeds; only episodes completed by both count. "
        f"Significant: McNemar p < {ALPHA:g}."
    )


def significance_line(table: Table) -> str:
    """The differences with McNemar p < 0.05, or that there are none."""
    hits = [
        f"{m} on {t if t != ALL_TASKS else 'all tasks'} ({_num(pc.diff, sign=True)})"
        for m in table.refined
        for t in [*table.tasks, ALL_TASKS]
        if (pc := table.paired.get((m, t))) is not None and pc.significant
    ]
    if not hits:
        return f"No difference is significant at p < {ALPHA:g}."
    return f"Significant at p < {ALPHA:g} (not corrected for multiple comparisons): {'; '.join(hits)}."


def _paired_rows(table: Table, style: str) -> list[list[str]]:
    return [
        [m, *(_paired_cell(table.paired.get((m, t)), style) for t in [*table.tasks, ALL_TASKS])]
        for m in table.refined
    ]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(tables: list[Table]) -> str:
    out = []
    for table in tables:
        out += [f"### {table.suite}", "", _caption(table), ""]
        out += _markdown_table(["Method", *table.tasks, "Average"], _rows(table, "markdown"))
        out.append("")
        if table.refined:
            out += [_paired_caption(table), ""]
            out += _markdown_table(["Method", *table.tasks, ALL_TASKS], _paired_rows(table, "markdown"))
            out += ["", significance_line(table), ""]
    return "\n".join(out)


def _esc(text: str) -> str:
    return text.replace("_", "\\_").replace("%", "\\%").replace("<", "$<$")


def _latex_table(caption: str, header: list[str], rows: list[list[str]], note: str = "") -> list[str]:
    out = [
        "\\begin{table}[t]",
        "\\centering",
        "\\caption{" + _esc(caption).replace("±", "$\\pm$") + "}",
        f"\\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}",
        "\\toprule",
        " & ".join(map(_esc, header)) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join([_esc(row[0]), *row[1:]]) + " \\\\" for row in rows]
    out += ["\\bottomrule", "\\end{tabular}"]
    if note:
        out.append("\\par\\smallskip " + _esc(note))
    return [*out, "\\end{table}", ""]


def render_latex(tables: list[Table]) -> str:
    out = []
    for table in tables:
        out += _latex_table(_caption(table), ["Method", *table.tasks, "Average"], _rows(table, "latex"))
        if table.refined:
            header = ["Method", *table.tasks, ALL_TASKS]
            rows = _paired_rows(table, "latex")
            out += _latex_table(_paired_caption(table), header, rows, significance_line(table))
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    """Long format: one row per (suite, method, task), plus each method's average."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "suite",
            "metric",
            "method",
            "task",
            "mean",
            "std",
            "seeds",
            "episodes",
            "wilson95_low",
            "wilson95_high",
        ]
    )
    for table in tables:
        for m in table.methods:
            for t in table.tasks:
                if (c := table.cells.get((m, t))) is not None:
                    lo, hi = c.interval(table.metric)
                    w.writerow(
                        [
                            table.suite,
                            table.metric,
                            m,
                            t,
                            f"{c.mean:.2f}",
                            f"{c.std:.2f}",
                            len(c.rates),
                            c.n,
                            f"{lo:.2f}",
                            f"{hi:.2f}",
                        ]
                    )
            if (avg := table.average(m)) is not None:
                w.writerow([table.suite, table.metric, m, "Average", f"{avg:.2f}", "", "", "", "", ""])
    return buf.getvalue()


PAIRED_COLUMNS = [
    "suite",
    "metric",
    "method",
    "base_method",
    "task",
    "pairs",
    "base_rate",
    "method_rate",
    "diff_points",
    "ci_low",
    "ci_high",
    "discordant_base_only",
    "discordant_method_only",
    "mcnemar_p",
    "significant",
]


def render_paired_csv(tables: list[Table]) -> str:
    """Long format: one row per (suite, refined method, task | "All tasks"); rates and differences
    in points of the table's metric; ``discordant_*`` count the pairs where only the base / only the
    method had that metric's event (a success, or a failure)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PAIRED_COLUMNS)
    for table in tables:
        for m in table.refined:
            for t in [*table.tasks, ALL_TASKS]:
                if (pc := table.paired.get((m, t))) is None:
                    continue
                c, (lo, hi) = pc.table, pc.interval
                w.writerow(
                    [table.suite, table.metric, m, pc.base_method, t, c.n]
                    + [f"{100 * c.base_rate:.2f}", f"{100 * c.method_rate:.2f}", f"{pc.diff:.2f}"]
                    + [f"{lo:.2f}", f"{hi:.2f}", c.base_only, c.method_only, f"{pc.p_value:.4g}"]
                    + [str(pc.significant).lower()]
                )
    return buf.getvalue()


def metrics(tables: list[Table]) -> dict[str, Any]:
    """``results/metrics.json`` for ``dvc metrics show``: suite -> task|average -> method -> rate,
    and suite -> paired -> task|all_tasks -> method -> {diff_points, ci95, p_value, pairs}."""
    out: dict[str, Any] = {}
    for table in tables:
        d: dict[str, Any] = {"metric": f"{table.metric}_rate_percent"}
        for t in table.tasks:
            d[t] = {m: round(c.mean, 2) for m in table.methods if (c := table.cells.get((m, t)))}
        d["average"] = {m: round(a, 2) for m in table.methods if (a := table.average(m)) is not None}
        paired: dict[str, Any] = {}
        for t in [*table.tasks, ALL_TASKS]:
            cells = {m: pc for m in table.refined if (pc := table.paired.get((m, t))) is not None}
            if cells:
                paired["all_tasks" if t == ALL_TASKS else t] = {
                    m: {
                        "diff_points": round(pc.diff, 2),
                        "ci95": [round(v, 2) for v in pc.interval],
                        "p_value": float(f"{pc.p_value:.4g}"),
                        "pairs": pc.table.n,
                    }
                    for m, pc in cells.items()
                }
        d["paired"] = paired
        out[table.suite] = d
    return out


def plot(tables: list[Table], path: Path) -> None:
    """One row of per-task grouped bars (one per method) per suite, with Wilson 95% intervals of
    the pooled episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(1.6 * len(t.tasks) * max(1, len(t.methods) / 3) for t in tables)
    fig, axes = plt.subplots(len(tables), 1, figsize=(max(4.0, widest), 3.6 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        _plot_table(ax, table)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _plot_table(ax: Any, table: Table) -> None:
    n_m = len(table.methods)
    width = 0.8 / n_m
    for i, m in enumerate(table.methods):
        xs, ys, err = [], [], [[], []]
        for j, t in enumerate(table.tasks):
            if (c := table.cells.get((m, t))) is not None:
                lo, hi = c.interval(table.metric)
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(c.mean)
                err[0].append(max(0.0, c.mean - lo))
                err[1].append(max(0.0, hi - c.mean))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=m)
    ax.set_xticks(range(len(table.tasks)), table.tasks)
    ax.set_ylabel(f"{table.metric} rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{table.suite}: {table.metric} rate, Wilson 95% intervals")
    ax.legend(fontsize=7, ncol=min(n_m, 4), loc="upper center", bbox_to_anchor=(0.5, -0.15))


def _bars_csv(tables: list[Table]) -> str:
    """Rows for the dvc.yaml ``plots:`` bar chart (suite's metric, task and method -> rate)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "rate"])
    for table in tables:
        for m in table.methods:
            for t in table.tasks:
                if (c := table.cells.get((m, t))) is not None:
                    w.writerow([f"{table.metric} | {t} | {m}", f"{c.mean:.2f}"])
    return buf.getvalue()


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_report(results_dir: Path, tables_dir: Path, plots_dir: Path, metrics_path: Path) -> list[Table]:
    """Read every results file under ``results_dir`` and write tables, plots and metrics."""
    files = find_results(results_dir)
    tables = aggregate([(p, EvalResult.read(p)) for p in files])
    by_metric: dict[str, list[Table]] = defaultdict(list)
    for t in tables:
        by_metric[t.metric].append(t)
    for metric, group in by_metric.items():
        _write_text(tables_dir / f"{metric}.md", render_markdown(group))
        _write_text(tables_dir / f"{metric}.csv", render_csv(group))
        _write_text(tables_dir / f"{metric}_paired.csv", render_paired_csv(group))
        _write_text(tables_dir / f"{metric}.tex", render_latex(group))
    # Fixed names, whichever suites ran: dvc.yaml's plots section lists them.
    _write_text(plots_dir / "rates.csv", _bars_csv(tables))
    plot(tables, plots_dir / "rates.png")
    _write_text(metrics_path, json.dumps(metrics(tables), indent=2))
    log.info("report: %d results files, %d table(s) -> %s", len(files), len(tables), tables_dir)
    return tables
