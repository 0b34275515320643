"""Benchmark evaluation rollouts: episodes per second of one worker, old path vs batched + lazy.

    OMP_NUM_THREADS=1 python benchmarks/evaluation.py --demos data/demos/sweep-into.zarr \\
        [--base models/sweep-into/dp3/seed0] [--refiner models/sweep-into/dp3-difftori/seed0] \\
        [--episodes 8] [--configs 1:eager 8:lazy]

For (a) the base policy alone and (b) DiffTORI + base, and each configuration
``<envs per worker>:<eager|lazy>`` (default ``1:eager``, the old path: one env, a policy call per
episode step, every observation rendered; and ``8:lazy``: 8 envs per policy call, only the
observations the policy sees rendered), it builds what one evaluation worker builds
(``PolicyEpisodes``: the policy, 1 torch thread, the envs from the demo store's metadata) and runs
``--episodes`` episodes of ``--max-episode-steps`` (200) on the evaluation seeds in this process.
Prints one JSON line per configuration: start-up time (policy load + env construction), rollout
time, episodes per second, seconds per episode, control steps (policy calls per episode step) and
env steps per second, successes, the process's CPU time (robust to other load on the machine) and
the speed-ups (wall and CPU) over the first configuration of the same method.

Checkpoints that do not exist are replaced by untrained ones of the pipeline's sizes (params.yaml
``policies.dp3`` and ``refiner_configs.difftori``) built from the demo store; ``models`` in the
output says which. Untrained policies rarely succeed, so every episode runs the full step limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from difftori.base_policies import ShapeMeta, make_policy
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.windows import WindowDataset
from difftori.eval.evaluate import EvalConfig, PolicyEpisodes, episode_seeds, run_policy_episodes
from difftori.pipeline.compose import policy_loader
from difftori.refiners import REFINERS

ROOT = Path(__file__).resolve().parents[1]


def untrained(demos: Path, out: Path, params: dict) -> tuple[Path, Path]:
    """DP3 and DiffTORI of the pipeline's sizes, normalisers fitted on the demos, saved to ``out``."""
    store = EpisodeStore(demos)
    shape = ShapeMeta.from_store(store)
    base = make_policy("dp3", params["policies"].get("dp3") or {}, shape)
    data = WindowDataset(store, base.obs_keys, base.horizon, base.n_obs_steps).arrays()
    base.fit_normalizer(data)
    windows = {k: getattr(base, k) for k in ("horizon", "n_obs_steps", "n_action_steps")}
    cfg = dict(params["refiner_configs"].get("difftori") or {}) | windows
    refiner = REFINERS.make("difftori", cfg, shape)
    refiner.fit_normalizer(WindowDataset(store, refiner.obs_keys, base.horizon, base.n_obs_steps).arrays())
    return base.save(out / "dp3"), refiner.save(out / "difftori")


@torch.no_grad()
def warm_up(envs: list, policy: torch.nn.Module) -> None:
    """One reset of every env and one policy call (first renders and first calls are slow)."""
    obs = [env.reset(seed=0)[0] for env in envs]
    batch = {k: torch.from_numpy(np.stack([o[k] for o in obs])) for k in policy.obs_keys}
    policy.predict_action(batch, [torch.Generator().manual_seed(0) for _ in envs])


def run(
    demos: Path, base: Path, refiner: Path | None, envs: int, lazy: bool, args: argparse.Namespace
) -> dict:
    """Build one worker's policy and envs, then time ``args.episodes`` episodes through them."""
    meta = EpisodeStore(demos, check_values=False).meta
    cfg = EvalConfig(
        episodes=args.episodes,
        max_episode_steps=args.max_episode_steps,
        workers=1,
        envs_per_worker=envs,
        num_threads=1,
        lazy_obs=lazy,
    )
    start = time.perf_counter()
    batch = PolicyEpisodes(meta, policy_loader(base, refiner), cfg, envs)()
    ready = time.perf_counter()
    warm_up(batch.envs, batch.policy)
    seeds = episode_seeds(cfg.seed, cfg.episodes, exclude=set(meta.episode_seeds))
    ready, startup, cpu = time.perf_counter(), ready - start, time.process_time()
    records = run_policy_episodes(batch.envs, batch.policy, list(enumerate(seeds)))
    rollout, cpu = time.perf_counter() - ready, time.process_time() - cpu
    for env in batch.envs:
        env.close()
    ta = batch.policy.n_action_steps
    env_steps = sum(r.steps for r in records)
    control_steps = sum(-(-r.steps // ta) for r in records)
    return {
        "envs_per_worker": envs,
        "observations": "lazy" if lazy else "eager",
        "episodes": len(records),
        "successes": sum(r.success for r in records),
        "env_steps": env_steps,
        "control_steps": control_steps,
        "startup_s": round(startup, 2),
        "rollout_s": round(rollout, 2),
        "episodes_per_s": round(len(records) / rollout, 4),
        "s_per_episode": round(rollout / len(records), 3),
        "control_steps_per_s": round(control_steps / rollout, 2),
        "env_steps_per_s": round(env_steps / rollout, 1),
        "cpu_s": round(cpu, 2),  # this process's CPU time (all its threads): robust to other load
        "episodes_per_cpu_s": round(len(records) / cpu, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, default=ROOT / "data/demos/sweep-into.zarr")
    p.add_argument("--base", type=Path, default=ROOT / "models/sweep-into/dp3/seed0")
    p.add_argument("--refiner", type=Path, default=ROOT / "models/sweep-into/dp3-difftori/seed0")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--max-episode-steps", type=int, default=200)
    p.add_argument("--configs", nargs="+", default=["1:eager", "8:lazy"], help="<envs>:<eager|lazy>")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    configs = [(int(c.split(":")[0]), c.split(":")[1] == "lazy") for c in args.configs]
    with tempfile.TemporaryDirectory() as tmp:
        base, refiner, models = args.base, args.refiner, "checkpoints"
        if not (base / "config.json").exists() or not (refiner / "config.json").exists():
            params = yaml.safe_load(args.params.read_text())
            base, refiner = untrained(args.demos, Path(tmp), params)
            models = "untrained, pipeline-sized (params.yaml), built from the demo store"
        task = EpisodeStore(args.demos, check_values=False).meta.task
        for method, ref in (("DP3", None), ("DiffTORI + DP3", refiner)):
            first = None
            for envs, lazy in configs:
                row = run(args.demos, base, ref, envs, lazy, args)
                first = first or row
                row["speedup"] = round(row["episodes_per_s"] / first["episodes_per_s"], 2)
                row["speedup_cpu"] = round(row["episodes_per_cpu_s"] / first["episodes_per_cpu_s"], 2)
                head = {"benchmark": "evaluation", "task": task, "method": method, "models": models}
                print(json.dumps(head | row | {"max_episode_steps": args.max_episode_steps}), flush=True)


if __name__ == "__main__":
    main()
