"""Benchmark one control step (base sampling + refinement) of trained checkpoints, one thread.

    OMP_NUM_THREADS=1 python benchmarks/control_step.py --demos data/demos/box-close.zarr \\
        --base models/box-close/dp3/seed0 --refiner models/box-close/dp3-difftori/seed0 \\
        [--batch-sizes 1 8] [--ddim-steps 10 5] [--repeats 30]

The observations are real: observation windows of the demo store's episodes (the policies' own
keys and frame counts), ``--repeats`` different ones per setting. For every batch size (envs
stepped together by one evaluation worker) and number of DDIM steps of the base, it times on one
torch thread:

* ``base_ms``: ``base.predict_action_chunk`` (DDIM sampling of the window);
* ``refine_ms``: ``refiner.refine`` on that window, with ``lm_iterations``, the Levenberg-Marquardt
  iterations the solves really took (mean over calls) out of ``trajopt.max_iterations``;
* ``control_step_ms``: the two together, and ``per_env_ms`` = ``control_step_ms / batch``: what one
  env's control step costs in a batched evaluation worker (the simulator's own time excluded);
* ``action_shift``: mean |refined - base| over the window, env units.

Prints one JSON line per setting (medians over the calls). Fewer DDIM steps change the base policy
itself; their closed-loop effect is not measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from difftori.base_policies import load_policy
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.windows import WindowDataset
from difftori.refiners import REFINERS

log = logging.getLogger("benchmarks.control_step")


def observation_batches(
    demos: Path, keys: list[str], n_obs_steps: int, batch: int, repeats: int
) -> list[dict]:
    """``repeats`` batches of ``batch`` real observation windows ``{key: (B, To, ...)}``."""
    data = WindowDataset(EpisodeStore(demos), keys, n_obs_steps, n_obs_steps)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(repeats):
        items = [data[int(i)]["obs"] for i in rng.integers(0, len(data), batch)]
        out.append({k: torch.stack([it[k] for it in items]).float() for k in keys})
    return out


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


@torch.no_grad()
def measure(base, refiner, batches: list[dict]) -> dict:
    """Median base / refine / total times over ``batches`` (the first call is a warm-up)."""
    base_s, refine_s, iters, shift = [], [], [], []
    for i, obs in enumerate(batches):
        gen = torch.Generator().manual_seed(i)
        b_s, init = timed(base.predict_action_chunk, obs, gen)
        r_s, refined = timed(refiner.refine, obs, init, gen)
        if i:
            base_s.append(b_s)
            refine_s.append(r_s)
            iters.append(refiner.last_iterations)
            shift.append(float((refined - init).abs().mean()))
    total = np.median(np.add(base_s, refine_s))
    return {
        "base_ms": round(1e3 * float(np.median(base_s)), 2),
        "refine_ms": round(1e3 * float(np.median(refine_s)), 2),
        "control_step_ms": round(1e3 * float(total), 2),
        "lm_iterations": round(float(np.mean(iters)), 2),
        "action_shift": round(float(np.mean(shift)), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, required=True)
    p.add_argument("--base", type=Path, required=True, help="trained base checkpoint (e.g. dvc repro's)")
    p.add_argument("--refiner", type=Path, required=True, help="trained DiffTORI checkpoint")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ddim-steps", type=int, nargs="+", default=[10])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--weights", default="ema")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    base = load_policy(args.base, args.weights).eval()
    refiner = REFINERS.load(args.refiner, args.weights).eval()
    keys = list(dict.fromkeys([*base.obs_keys, *refiner.obs_keys]))
    for batch in args.batch_sizes:
        batches = observation_batches(args.demos, keys, base.n_obs_steps, batch, args.repeats + 1)
        for steps in args.ddim_steps:
            base.config = dataclasses.replace(base.config, num_inference_steps=steps)
            row = measure(base, refiner, batches)
            row["per_env_ms"] = round(row["control_step_ms"] / batch, 2)
            head = {
                "benchmark": "control_step",
                "base": str(args.base),
                "refiner": str(args.refiner),
                "threads": 1,
                "batch_size": batch,
                "ddim_steps": steps,
                "max_iterations": refiner.config.trajopt.max_iterations,
            }
            print(json.dumps(head | row), flush=True)


if __name__ == "__main__":
    main()
