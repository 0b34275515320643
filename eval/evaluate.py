"""Rollout evaluation of a base policy, alone or refined, in its simulator.

The env is the one the demos came from (suite, task and observation settings are read from the
demo store's metadata, so evaluation sees the world through the same code and settings), wrapped
in :class:`~difftori.eval.envs.multistep.MultiStepWrapper` for the policy's observation history and
action chunks. Episode seeds are drawn from ``EvalConfig.seed`` alone (never a demo seed), so every
method and training seed is evaluated on the same initial states; the policy's sampling generator
of an episode is seeded with the episode's env seed. Success = the task's success flag at any step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from difftori.base_policies import load_policy
from difftori.datasets.episode_store import EpisodeStore
from difftori.eval.envs import make_env
from difftori.eval.envs.multistep import MultiStepWrapper
from difftori.eval.results import EpisodeRecord, EvalResult
from difftori.eval.workers import EpisodeFn, run_in_workers
from difftori.refiners import REFINERS, RefinedPolicy

log = logging.getLogger(__name__)
BASE_LABELS = {
    "dp3": "DP3",
    "diffusion": "Diffusion Policy",
    "pointnet_bc": "PointNet-BC",
    "bc_rnn": "BC-RNN",
}


@dataclass(frozen=True)
class EvalConfig:
    """params.yaml ``evaluate``."""

    episodes: int = 20
    seed: int = 100  # the evaluation episode seeds are drawn from this
    max_episode_steps: int = 200  # MetaWorld's limit in DP3 and DiffTORI
    workers: int = 2  # simulator processes
    retries: int = 1  # a crashed episode is run once more, then recorded as an error
    videos: int = 0  # mp4 of the first k episodes
    weights: str = "ema"
    num_threads: int = 1  # torch threads per worker

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.workers < 1 or self.max_episode_steps < 1 or self.retries < 0:
            raise ValueError(f"invalid evaluation config {self}")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {self.weights!r}")


def episode_seeds(seed: int, n: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct env seeds drawn from ``seed``, none in ``exclude`` (the demos' seeds)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    out: list[int] = []
    while len(out) < n:
        s = int(rng.integers(0, 2**31 - 1))
        if s not in exclude and s not in out:
            out.append(s)
    return out


def load_eval_policy(base: Path, refiner: Path | None, weights: str = "ema") -> tuple[torch.nn.Module, str]:
    """The policy to roll out (base, or ``RefinedPolicy``) and its method label for the tables."""
    policy = load_policy(base, weights)
    label = BASE_LABELS.get(policy.name, policy.name)
    if refiner is None:
        return policy, label
    ref = REFINERS.load(refiner, weights)
    return RefinedPolicy(policy, ref).eval(), ref.method_label(label)


@dataclass(frozen=True)
class PolicyEpisodes:
    """Builds, inside a worker, the env and the policy, and returns the episode function."""

    suite: str
    task: str
    env_options: dict
    base: str
    refiner: str | None
    cfg: EvalConfig
    video_dir: str | None = None

    def __call__(self) -> EpisodeFn:
        torch.set_num_threads(self.cfg.num_threads)
        policy, _ = load_eval_policy(
            Path(self.base), Path(self.refiner) if self.refiner else None, self.cfg.weights
        )
        env = make_env(
            self.suite, self.task, **self.env_options, max_episode_steps=self.cfg.max_episode_steps
        )
        env = MultiStepWrapper(env, policy.n_obs_steps)

        def run(episode: int, seed: int) -> EpisodeRecord:
            video = self.video_dir is not None and episode < self.cfg.videos
            record = run_policy_episode(env, policy, episode, seed, record_frames=video)
            if video:
                path = Path(self.video_dir) / f"episode{episode:03d}_seed{seed}.mp4"
                try:
                    write_video(path, env.frames)
                except (OSError, RuntimeError, ValueError) as e:  # a video never costs the episode
                    log.warning("%s: video not written: %s", path, e)
            return record

        return run


@torch.no_grad()
def run_policy_episode(
    env: MultiStepWrapper, policy: torch.nn.Module, episode: int, seed: int, record_frames: bool = False
) -> EpisodeRecord:
    """One episode: reset with ``seed``, then predict and execute action chunks until it ends."""
    start = time.perf_counter()
    env.record_frames = record_frames
    obs, _ = env.reset(seed=seed)
    policy.reset()
    gen = torch.Generator().manual_seed(seed)
    keys = policy.obs_keys
    success, ret, steps, done = False, 0.0, 0, False
    while not done:
        batch = {k: torch.from_numpy(obs[k][None]) for k in keys}
        actions = policy.predict_action(batch, gen)[0].cpu().numpy()
        obs, reward, terminated, truncated, info = env.step(actions)
        ret += reward
        steps += info["steps"]
        success = success or info["success"]
        done = terminated or truncated
    return EpisodeRecord(
        episode, seed, success=success, steps=steps, ret=ret, wall_s=time.perf_counter() - start
    )


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> None:
    """Frames (H, W, 3) uint8 to an H.264 mp4 (imageio-ffmpeg), atomically."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    tmp.replace(path)


def evaluate(
    demos: Path,
    base: Path,
    refiner: Path | None,
    seed: int,
    out: Path,
    cfg: EvalConfig,
    video_dir: Path | None = None,
    progress: bool = True,
    refiner_name: str | None = None,
) -> EvalResult:
    """Roll out the (refined) policy for ``cfg.episodes`` episodes and write the results to ``out``.

    ``refiner_name`` is recorded as the refiner (default: the refiner's registered name; a params
    variant such as ``ibc_alone`` passes its own name).
    """
    meta = EpisodeStore(demos, check_values=False).meta
    policy, method = load_eval_policy(base, refiner, cfg.weights)  # fail here, clearly, not in workers
    missing = [k for k in policy.obs_keys if k not in meta.obs_kinds]
    if missing:
        raise ValueError(f"{base}: the policy observes {missing[0]!r}, which {demos} does not hold")
    is_refined = isinstance(policy, RefinedPolicy)
    base_name = policy.base.name if is_refined else policy.name
    refiner_name = refiner_name or (policy.refiner.name if is_refined else "none")
    del policy
    seeds = episode_seeds(cfg.seed, cfg.episodes, exclude=set(meta.episode_seeds))
    env_options = {"obs": meta.params["obs"]} if "obs" in meta.params else {}
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
    factory = PolicyEpisodes(
        meta.suite,
        meta.task,
        env_options,
        str(base),
        str(refiner) if refiner else None,
        cfg,
        str(video_dir) if video_dir else None,
    )
    log.info("evaluating %s on %s: %d episodes, %d workers", method, meta.task, len(seeds), cfg.workers)
    records = run_in_workers(
        factory, seeds, cfg.workers, cfg.retries, desc=f"{meta.task} {method}", progress=progress
    )
    result = EvalResult(
        suite=meta.suite,
        task=meta.task,
        base=base_name,
        refiner=refiner_name,
        seed=seed,
        method=method,
        checkpoints={"base": str(base), "refiner": str(refiner) if refiner else None},
        config=asdict(cfg),
        episodes=records,
    )
    result.write(out)
    s = result.summary()
    log.info(
        "%s on %s: success %d/%d (%.1f%%, Wilson 95%% [%.1f, %.1f]), %d errors -> %s",
        method,
        meta.task,
        s["successes"],
        s["n"],
        100 * s["success_rate"],
        100 * s["wilson95"][0],
        100 * s["wilson95"][1],
        s["errors"],
        out,
    )
    return result
