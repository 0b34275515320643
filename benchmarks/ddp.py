"""Benchmark training throughput under Lightning DDP: 1 process against N (gloo on CPU, NCCL on GPUs).

    OMP_NUM_THREADS=1 python benchmarks/ddp.py --demos data/demos/box-close.zarr \\
        [--policy dp3] [--steps 40] [--settings 1x1 1x2 2x1] [--accelerator cpu|gpu] [--config JSON]

Each setting ``<processes>x<threads>`` runs ``difftori train-base`` (the stage's own code, through
the CLI, so Lightning launches the DDP processes itself) twice, for ``--steps`` and for 2 x
``--steps`` steps, with params.yaml's policy config and ``batch_size`` per process, and prints one
JSON line: the fit time of each run from the saved summary (``train_time_s``, which includes
starting the other DDP processes), the whole commands' wall times, and the steady per-step time
(the difference of the two fits over ``--steps``: start-up cancels). Windows per second is the
comparable figure: N processes take N x ``batch_size`` windows per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DIFFTORI = str(Path(sys.executable).parent / "difftori")


def run(args: argparse.Namespace, steps: int, processes: int, threads: int, params: dict, tmp: Path) -> dict:
    """One ``difftori train-base`` run of ``steps`` steps; its timings."""
    policy = args.policy
    train = dict(params["train_base"]) | {
        "max_steps": steps,
        "val_every_steps": steps,
        "num_threads": threads,
        "rollout_every_steps": 0,
        "accelerator": args.accelerator,
        "devices": processes,
        "strategy": "ddp" if processes > 1 else "auto",
    }
    config = (params["policies"].get(policy) or {}) | args.config
    cfg = {"train_base": train | args.train, "policies": {policy: config}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / f"{processes}x{threads}"
    cmd = [
        DIFFTORI,
        "train-base",
        "--task",
        "bench",
        "--policy",
        policy,
        "--params",
        str(tmp / "params.yaml"),
    ]
    cmd += ["--demos", str(args.demos), "--out", str(out), "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {
        "processes": summary["world_size"],
        "accelerator": args.accelerator,
        "config": config,
        "threads_per_process": threads,
        "batch_size_per_process": cfg["train_base"]["batch_size"],
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
        "wall_s": round(wall, 1),
    }


def measure(args: argparse.Namespace, processes: int, threads: int, params: dict) -> dict:
    """Runs of ``--steps`` and 2 x ``--steps``; the steady per-step time from their difference."""
    with tempfile.TemporaryDirectory() as tmp:
        short = run(args, args.steps, processes, threads, params, Path(tmp))
        long = run(args, 2 * args.steps, processes, threads, params, Path(tmp))
    step_s = (long["train_time_s"] - short["train_time_s"]) / args.steps
    windows = short["batch_size_per_process"] * short["processes"]
    return {k: v for k, v in short.items() if k not in ("steps", "train_time_s", "wall_s")} | {
        "steps": [short["steps"], long["steps"]],
        "train_time_s": [short["train_time_s"], long["train_time_s"]],
        "wall_s": [short["wall_s"], long["wall_s"]],
        "step_s": round(step_s, 4),
        "windows_per_s": round(windows / step_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, default=ROOT / "data/demos/box-close.zarr")
    p.add_argument("--policy", default="dp3")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--settings", nargs="+", default=["1x1", "1x2", "2x1"], help="<processes>x<threads>")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu or gpu")
    p.add_argument("--config", type=json.loads, default={}, help="JSON override of the policy config")
    p.add_argument("--train", type=json.loads, default={}, help="JSON override of train_base")
    args = p.parse_args()
    params = yaml.safe_load(args.params.read_text())
    first = None
    for setting in args.settings:
        processes, threads = (int(x) for x in setting.split("x"))
        row = measure(args, processes, threads, params)
        first = first or row
        row["speedup_windows_per_s"] = round(row["windows_per_s"] / first["windows_per_s"], 2)
        print(json.dumps({"benchmark": "ddp", "policy": args.policy} | row), flush=True)


if __name__ == "__main__":
    main()
