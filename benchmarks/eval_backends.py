"""Benchmark the evaluation backends: the process pool against Ray, through ``evaluate()`` itself.

    OMP_NUM_THREADS=1 python benchmarks/eval_backends.py --demos data/demos/box-close.zarr \\
        [--base models/box-close/dp3/seed0] [--episodes 16] [--workers 1 2] [--backends processes ray]

For each backend and worker count it runs one evaluation stage's work (``evaluate`` with a
journal, results file and ``envs_per_worker`` envs per worker) on the base policy: a local Ray
instance is started and shut down inside, as the ``evaluate`` stage does. Prints one JSON line
each: wall time, Ray's start-up and shut-down alone (``ray.init`` to ``ray.shutdown`` with no
work), the peak memory in use on the machine above the idle level before the run (sampled every
0.2 s from /proc/meminfo, so run it on a quiet machine), successes, and whether the records equal
the first backend's (they must: the same seeds and per-episode generators).

A base checkpoint that does not exist is replaced by an untrained DP3 of the pipeline's size
(params.yaml), which rarely succeeds, so every episode runs the full step limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from difftori.eval.evaluate import EvalConfig, evaluate
from difftori.eval.ray_workers import ray_session
from difftori.pipeline.compose import policy_loader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from evaluation import untrained  # noqa: E402


def used_mb() -> float:
    """Memory in use on the machine (MemTotal - MemAvailable), MB."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kb / 1024


class PeakMemory:
    """Samples :func:`used_mb` every 0.2 s in a thread; ``peak`` above the level at start."""

    def __enter__(self) -> PeakMemory:
        self.idle, self.peak, self._stop = used_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, used_mb() - self.idle)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_overhead(workers: int) -> dict[str, float]:
    """Seconds to start and to shut down a local Ray instance of ``workers`` CPUs, with no work."""
    start = time.perf_counter()
    with ray_session(workers, None):
        up = time.perf_counter()
    return {"ray_init_s": round(up - start, 2), "ray_shutdown_s": round(time.perf_counter() - up, 2)}


def run(demos: Path, base: Path, cfg: EvalConfig, out: Path) -> dict:
    """One evaluation of ``base`` on ``demos`` with ``cfg``: timings, memory, records."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        result = evaluate(demos, policy_loader(base, None), 0, out, cfg, progress=False)
        wall = time.perf_counter() - start
    keys = [(r.env_seed, r.success, r.steps, round(r.ret, 4)) for r in result.episodes]
    return {
        "wall_s": round(wall, 2),
        "peak_mem_mb": round(mem.peak),
        "successes": result.summary()["successes"],
    }, keys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, default=ROOT / "data/demos/box-close.zarr")
    p.add_argument("--base", type=Path, default=ROOT / "models/box-close/dp3/seed0")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--max-episode-steps", type=int, default=200)
    p.add_argument("--envs-per-worker", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backends", nargs="+", default=["processes", "ray"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base, models = args.base, "checkpoint"
        if not (base / "config.json").exists():
            base = untrained(args.demos, Path(tmp), yaml.safe_load(args.params.read_text()))[0]
            models = "untrained, pipeline-sized (params.yaml)"
        cfg = EvalConfig(
            episodes=args.episodes,
            max_episode_steps=args.max_episode_steps,
            envs_per_worker=args.envs_per_worker,
        )
        for workers in args.workers:
            first = None
            for backend in args.backends:
                c = replace(cfg, workers=workers, backend=backend)
                row, keys = run(args.demos, base, c, Path(tmp) / f"{backend}{workers}.json")
                first = first or keys
                row |= {"same_records": keys == first}
                if backend == "ray":
                    row |= ray_overhead(workers)
                head = {
                    "benchmark": "eval_backends",
                    "backend": backend,
                    "workers": workers,
                    "models": models,
                }
                head |= {"episodes": args.episodes, "envs_per_worker": args.envs_per_worker}
                print(json.dumps(head | row), flush=True)


if __name__ == "__main__":
    main()
