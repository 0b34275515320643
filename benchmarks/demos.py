"""Benchmark demo generation: expert steps/s and milliseconds per point cloud.

    python benchmarks/demos.py [--task shelf-place] [--steps 400] [--clouds 100]

Prints one JSON object:
  expert_state_steps_per_s   scripted expert + simulator, no rendering
  point_cloud_ms             render + back-project + crop + FPS, and each part
  demo_steps_per_s           a full recorded step (expert, simulator, point cloud)
  demos_10_s                 wall time of generating 10 demos into a store
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from difftori.datasets.pointcloud import (  # noqa: E402
    camera_to_world,
    depth_to_camera_points,
    farthest_point_sample,
)
from difftori.eval.demos import DemoConfig, generate_demos  # noqa: E402
from difftori.eval.multistep import MultiStepWrapper  # noqa: E402
from difftori.eval.rollout import ExpertPolicy, run_policy_episodes  # noqa: E402
from difftori.eval.suites.metaworld import MetaWorldExpert, make_env  # noqa: E402


def expert_state_steps_per_s(task: str, steps: int) -> float:
    env = make_env(task)
    expert = MetaWorldExpert(task)
    sim = env.sim
    sim.seed(0)
    state, _ = sim.reset()
    t0 = time.perf_counter()
    for i in range(steps):
        action = expert({"state": state.astype(np.float32)})
        state, _, _, truncated, info = sim.step(action)
        if info["success"] or truncated or sim.curr_path_length >= 200:
            sim.seed(i)
            state, _ = sim.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def point_cloud_ms(task: str, clouds: int) -> dict[str, float]:
    env = make_env(task)
    env.reset(seed=0)
    env.point_cloud()  # create the renderer
    cfg, cam = env.obs_config, env._cam_id
    model, data, renderer = env.sim.model, env.sim.data, env._depth
    parts = {"render": 0.0, "backproject_crop": 0.0, "fps": 0.0}
    for _ in range(clouds):
        t0 = time.perf_counter()
        renderer.update_scene(data, camera=cam)
        depth = renderer.render()
        t1 = time.perf_counter()
        world = camera_to_world(
            depth_to_camera_points(depth, model.cam_fovy[cam]), data.cam_xpos[cam], data.cam_xmat[cam]
        )
        inside = world[cfg.crop.contains(world)]
        t2 = time.perf_counter()
        farthest_point_sample(inside, cfg.n_points)
        t3 = time.perf_counter()
        parts["render"] += t1 - t0
        parts["backproject_crop"] += t2 - t1
        parts["fps"] += t3 - t2
    t0 = time.perf_counter()
    for _ in range(clouds):
        env.point_cloud()
    total = (time.perf_counter() - t0) / clouds * 1e3
    env.close()
    return {"total": round(total, 2), **{k: round(v / clouds * 1e3, 2) for k, v in parts.items()}}


def demo_steps_per_s(task: str) -> float:
    env = make_env(task)
    space = env.action_space
    expert = ExpertPolicy(MetaWorldExpert(task), list(env.obs_kinds), space.low, space.high)
    envs = [MultiStepWrapper(env, 1)]
    steps, t0 = 0, time.perf_counter()
    for seed in range(3):
        (record,) = run_policy_episodes(envs, expert, [(0, seed)], trajectories={})
        steps += record.steps
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="shelf-place")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--clouds", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        generate_demos(DemoConfig("metaworld", args.task, episodes=10, seed=0), f"{d}/demos.zarr")
        demos_10_s = time.perf_counter() - t0
    result = {
        "benchmark": "demos",
        "task": args.task,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "expert_state_steps_per_s": round(expert_state_steps_per_s(args.task, args.steps), 1),
        "point_cloud_ms": point_cloud_ms(args.task, args.clouds),
        "demo_steps_per_s": round(demo_steps_per_s(args.task), 1),
        "demos_10_s": round(demos_10_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
