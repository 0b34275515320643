"""Success/failure-rate tables (Markdown, CSV, LaTeX), plots and DVC metrics from results files.

Reads only the evaluation JSON files (:class:`~difftori.eval.results.EvalResult`). Tables are shaped
like the paper's Tables 1-3: one table per suite, rows = methods (the base alone, then each
refiner on it), columns = tasks + Average; a cell is the mean +- std (numpy's population std,
ddof=0) over training seeds of the per-seed rate in percent, and the best mean of each column is
bold. A single seed shows the mean alone. MetaWorld and ManiSkill report success rates; Robomimic
and Push-T report failure rates (lower is better). The Average column is the mean of a method's
per-task means (shown when the method has every task).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from difftori.eval.results import EvalResult, ResultsError, wilson_interval

log = logging.getLogger(__name__)
METRIC_BY_SUITE = {"metaworld": "success", "maniskill": "success", "robomimic": "failure", "pusht": "failure"}
REFINER_ORDER = ("none", "residual", "ibc", "difftori")


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
class Table:
    suite: str
    metric: str  # "success" or "failure"
    tasks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

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
    for path, r in results:
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
        table = tables.setdefault(suite, Table(suite, METRIC_BY_SUITE.get(suite, "success")))
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
    return [tables[s] for s in sorted(tables)]


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


def render_markdown(tables: list[Table]) -> str:
    out = []
    for table in tables:
        header = ["Method", *table.tasks, "Average"]
        out += [f"### {table.suite}", "", _caption(table), ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out += ["| " + " | ".join(row) + " |" for row in _rows(table, "markdown")]
        out.append("")
    return "\n".join(out)


def render_latex(tables: list[Table]) -> str:
    out = []
    for table in tables:
        esc = lambda s: s.replace("_", "\\_").replace("%", "\\%")  # noqa: E731
        out += [
            "\\begin{table}[t]",
            "\\centering",
            "\\caption{" + esc(_caption(table)).replace("±", "$\\pm$") + "}",
            f"\\begin{{tabular}}{{l{'c' * (len(table.tasks) + 1)}}}",
            "\\toprule",
            " & ".join(["Method", *map(esc, table.tasks), "Average"]) + " \\\\",
            "\\midrule",
        ]
        out += [" & ".join([esc(row[0]), *row[1:]]) + " \\\\" for row in _rows(table, "latex")]
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
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


def metrics(tables: list[Table]) -> dict[str, Any]:
    """``results/metrics.json`` for ``dvc metrics show``: suite -> task|average -> method -> rate."""
    out: dict[str, Any] = {}
    for table in tables:
        d: dict[str, Any] = {"metric": f"{table.metric}_rate_percent"}
        for t in table.tasks:
            d[t] = {m: round(c.mean, 2) for m in table.methods if (c := table.cells.get((m, t)))}
        d["average"] = {m: round(a, 2) for m in table.methods if (a := table.average(m)) is not None}
        out[table.suite] = d
    return out


def plot(table: Table, path: Path) -> None:
    """Per-task grouped bars (one per method) with Wilson 95% intervals of the pooled episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_m = len(table.methods)
    width = 0.8 / n_m
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(table.tasks) * max(1, n_m / 3)), 3.2))
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
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _bars_csv(tables: list[Table]) -> str:
    """Rows for the dvc.yaml ``plots:`` bar chart (method/task -> rate)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "rate"])
    for table in tables:
        for m in table.methods:
            for t in table.tasks:
                if (c := table.cells.get((m, t))) is not None:
                    w.writerow([f"{t} | {m}", f"{c.mean:.2f}"])
    return buf.getvalue()


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
        _write_text(tables_dir / f"{metric}.tex", render_latex(group))
        _write_text(plots_dir / f"{metric}_bars.csv", _bars_csv(group))
    for t in tables:
        plot(t, plots_dir / f"{t.metric}_{t.suite}.png")
    _write_text(metrics_path, json.dumps(metrics(tables), indent=2))
    log.info("report: %d results files, %d table(s) -> %s", len(files), len(tables), tables_dir)
    return tables
