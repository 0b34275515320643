"""Benchmark IBC's derivative-free optimiser (refiners/ibc.py): accuracy on a known 16-D energy,
and refine latency.

    OMP_NUM_THREADS=1 python benchmarks/ibc_dfo.py [--samples 256 1024 4096 16384] [--trials 64]

The window is DP3's 4 x 4 = 16 normalised dims. For each ``dfo_samples`` and each start:

* ``dfo``: ``IBCRefiner.refine`` with its energy replaced by the quadratic
  E(a) = |a - a*|^2 / (2 s^2) (``--energy-scale`` s, each value a row), a* uniform in
  [-0.8, 0.8]^16 per trial; starts ``uniform`` (IBC alone) and ``base`` (IBC + base: candidates
  around a base window a* + N(0, ``--base-error``^2), the refiner's default ``dfo_noise``).
  Reports the L2 distance |result - a*| (mean, 90th percentile over ``--trials``), its RMS per
  dim (mean / 4), and for base starts the base window's own distance.
* ``latency``: ``refine`` of an untrained IBC refiner of the pipeline's sizes (observation features
  256, hidden (256, 256)), batch 1, 1 torch thread, median over ``--repeats`` calls.

Each row for each ``--iterations`` value (``dfo_iterations``, energy evaluations; the paper's 3).

Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
from difftori.base_policies.base import ShapeMeta
from difftori.refiners import REFINERS
from difftori.refiners.ibc import IBCRefiner

log = logging.getLogger("ibc_dfo")
FEAT, H, DA = 128, 4, 4  # per-frame features (2 frames: 256), window
SHAPE = ShapeMeta(obs={"state": {"shape": [FEAT], "kind": "lowdim"}}, action_dim=DA)
WINDOW = {"horizon": H, "n_obs_steps": 2, "n_action_steps": 3, "encoder": {"lowdim_hidden": [FEAT, FEAT]}}


def make_refiner(init: str, samples: int, iterations: int) -> IBCRefiner:
    """An untrained IBC refiner whose normaliser is the identity on [-1, 1] actions."""
    cfg = WINDOW | {"init": init, "dfo_samples": samples, "dfo_iterations": iterations}
    refiner = REFINERS.make("ibc", cfg, SHAPE)
    rng = np.random.default_rng(0)
    refiner.fit_normalizer(
        {"state": rng.normal(size=(100, FEAT)), "action": np.array([[-1.0] * DA, [1.0] * DA])}
    )
    return refiner.eval()


def accuracy(
    init: str, samples: int, iterations: int, scale: float, trials: int, base_error: float, seed: int
) -> dict:
    """Distance of the DFO result to the argmin of a quadratic energy, over ``trials`` items."""
    gen = torch.Generator().manual_seed(seed)
    target = (torch.rand(trials, H * DA, generator=gen) * 2 - 1) * 0.8
    base = target + base_error * torch.randn(trials, H * DA, generator=gen)
    refiner = make_refiner(init, samples, iterations)
    refiner.energy = lambda feats, a: ((a - target[:, None]) ** 2).sum(-1) / (2 * scale**2)
    obs = {"state": torch.zeros(trials, 2, FEAT)}
    out = refiner.refine(obs, base.reshape(trials, H, DA), gen).flatten(1)
    dist = (out - target).norm(dim=-1)
    row = {
        "benchmark": "ibc_dfo/dfo",
        "init": init,
        "dfo_samples": samples,
        "dfo_iterations": refiner.config.dfo_iterations,
        "dfo_noise": refiner.config.dfo_sigma,
        "energy_scale": scale,
        "dims": H * DA,
        "trials": trials,
        "dist_mean": round(float(dist.mean()), 4),
        "dist_p90": round(float(dist.quantile(0.9)), 4),
        "rms_per_dim": round(float(dist.mean()) / (H * DA) ** 0.5, 4),
    }
    if init == "base":
        row["base_dist_mean"] = round(float((base - target).norm(dim=-1).mean()), 4)
    return row


def latency(init: str, samples: int, iterations: int, repeats: int) -> dict:
    """Median ``refine`` wall time of an untrained refiner at batch 1."""
    torch.manual_seed(0)
    refiner = make_refiner(init, samples, iterations)
    obs = {"state": torch.randn(1, 2, FEAT)}
    base = torch.rand(1, H, DA) * 2 - 1
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        refiner.refine(obs, base, torch.Generator().manual_seed(i))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "benchmark": "ibc_dfo/latency",
        "init": init,
        "dfo_samples": samples,
        "dfo_iterations": refiner.config.dfo_iterations,
        "batch_size": 1,
        "threads": 1,
        "median_ms": round(1e3 * float(np.median(times)), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--iterations", type=int, nargs="+", default=[3], help="dfo_iterations (the paper: 3)")
    p.add_argument("--inits", nargs="+", default=["uniform", "base"], choices=["uniform", "base"])
    p.add_argument("--energy-scale", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--base-error", type=float, default=0.15, help="std of the base window's error")
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    for init in args.inits:
        for iterations in args.iterations:
            for samples in args.samples:
                for scale in args.energy_scale:
                    row = accuracy(init, samples, iterations, scale, args.trials, args.base_error, args.seed)
                    print(json.dumps(row), flush=True)
                print(json.dumps(latency(init, samples, iterations, args.repeats)), flush=True)
                log.info("done: init %s, %d iterations, %d samples", init, iterations, samples)


if __name__ == "__main__":
    main()
