"""Benchmark base policies: training-step time and predict_action latency.

    python benchmarks/base_policies.py [--batch-size 64] [--threads 1] [--policies dp3 diffusion pointnet_bc]
        [--config '{"down_dims": [512, 1024, 2048]}']   # a config override (default: each default)

MetaWorld-shaped random data (512-point clouds, 4-D agent_pos, 39-D state, 4-D actions) with each
policy's default config. Prints one JSON line per policy:
  train_step_ms        forward + backward + AdamW step at --batch-size
  predict_ms_b1        predict_action for one observation (DDIM 10 steps for diffusion policies)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from difftori.base_policies import POLICIES, ShapeMeta, make_policy

SHAPES = {
    "point_cloud": {"shape": [512, 3], "kind": "point_cloud"},
    "agent_pos": {"shape": [4], "kind": "lowdim"},
    "state": {"shape": [39], "kind": "lowdim"},
}


def batch(policy, b: int, gen: torch.Generator) -> dict:
    obs = {k: torch.rand(b, policy.n_obs_steps, *SHAPES[k]["shape"], generator=gen) for k in policy.obs_keys}
    return {"obs": obs, "action": torch.rand(b, policy.horizon, 4, generator=gen) * 2 - 1}


def bench(name: str, batch_size: int, repeats: int, config: dict) -> dict:
    policy = make_policy(name, config, ShapeMeta(obs=SHAPES, action_dim=4))
    gen = torch.Generator().manual_seed(0)
    policy.fit_normalizer(
        {k: np.random.default_rng(0).random((100, *SHAPES[k]["shape"])) for k in SHAPES}
        | {"action": np.random.default_rng(1).uniform(-1, 1, (100, 4))}
    )
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    b = batch(policy, batch_size, gen)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = policy.compute_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    policy.eval()
    one = batch(policy, 1, gen)["obs"]
    lat = []
    for i in range(repeats * 4 + 3):
        t0 = time.perf_counter()
        policy.predict_action(one, gen)
        if i >= 3:
            lat.append(time.perf_counter() - t0)
    return {
        "benchmark": "base_policies",
        "policy": name,
        "config": config,
        "params": sum(p.numel() for p in policy.parameters()),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "train_step_ms": round(1e3 * float(np.median(times)), 1),
        "predict_ms_b1": round(1e3 * float(np.median(lat)), 2),
        "ddim_steps": getattr(policy.config, "num_inference_steps", None),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--policies", nargs="+", default=sorted(POLICIES))
    p.add_argument("--config", type=json.loads, default={}, help="JSON config for every policy named")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.policies:
        print(json.dumps(bench(name, args.batch_size, args.repeats, args.config)), flush=True)


if __name__ == "__main__":
    main()
