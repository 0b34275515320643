"""The results of DVC experiments, gathered for one merged report (``difftori report --from-experiments``).

A sweep runs as DVC experiments (``dvc exp run --queue -S 'tasks=[...]' -S 'seeds=[...]'``, then
``dvc queue start -j N``). Each experiment is a git commit whose ``dvc.lock`` names its evaluation
results in the DVC cache. :func:`export_results` copies every experiment's
``results/evals/**/seed*.json`` into ``<dest>/<experiment>/``, read through DVC's own file system
at the experiment's commit, and the report reads that folder like any results folder. Two
experiments that hold the same (task, method, seed) are an error naming both files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from difftori.eval.results import ResultsError

log = logging.getLogger(__name__)
RESULTS = "results/evals"


def experiments(repo: Path, names: list[str] | None = None) -> dict[str, str]:
    """Experiment name -> commit, for the experiments of ``repo``'s HEAD (only ``names``, if given)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        found = {name: sha for exps in r.experiments.ls().values() for name, sha in exps if sha}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            have = ", ".join(sorted(found)) or "none"
            raise ResultsError(f"{repo}: no DVC experiment named {missing[0]!r} on HEAD (have: {have})")
        found = {n: found[n] for n in names}
    if not found:
        raise ResultsError(f"{repo}: no DVC experiments on HEAD (run `dvc exp run --queue ...` first)")
    return found


def export_results(repo: Path, dest: Path, names: list[str] | None = None) -> list[Path]:
    """Copy each experiment's results files into ``dest/<name>/``; the files written."""
    from dvc.api import DVCFileSystem

    out: list[Path] = []
    for name, sha in experiments(repo, names).items():
        fs = DVCFileSystem(str(repo), rev=sha)
        files = [f for f in fs.find(RESULTS) if Path(f).name.startswith("seed") and f.endswith(".json")]
        if not files:
            raise ResultsError(f"experiment {name!r} ({sha[:7]}): no results files under {RESULTS}")
        for f in files:
            target = dest / name / Path(f).relative_to("/" if f.startswith("/") else "")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(target))
            out.append(target)
        log.info("experiment %s (%s): %d results files", name, sha[:7], len(files))
    return out
