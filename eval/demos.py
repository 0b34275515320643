"""Demo generation: roll a scripted expert out through the suite's env and record it.

Only successful episodes are kept; the store records how many were tried and the seed of each
kept episode. Attempt seeds are drawn from ``seed``, so the same config gives the same demos.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore, EpisodeWriter, StoreMeta
from difftori.datasets.safeio import OutputLock
from difftori.eval.envs import make_env
from difftori.eval.experts import make_expert
from difftori.eval.rollout import run_episode
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines a demo store's content (recorded in the store)."""

    suite: str
    task: str
    episodes: int = 10
    seed: int = 0
    max_attempts: int = 0  # 0: three times ``episodes``
    max_episode_steps: int = 200
    obs: dict[str, Any] = field(default_factory=dict)  # the env's observation options
    zarr_format: int = 2

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.max_attempts and self.max_attempts < self.episodes:
            raise ValueError(f"max_attempts ({self.max_attempts}) < episodes ({self.episodes})")
        if self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")
        if self.zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {self.zarr_format}")

    @property
    def attempts(self) -> int:
        return self.max_attempts or 3 * self.episodes

    def attempt_seeds(self) -> list[int]:
        """The env seed of every possible attempt, in order."""
        rng = np.random.default_rng(self.seed)
        return [int(s) for s in rng.integers(0, 2**31 - 1, size=self.attempts)]


def generate_demos(
    cfg: DemoConfig, out: str | Path, *, overwrite: bool = False, resume: bool = True, wait: bool = False
) -> EpisodeStore:
    """Write ``cfg.episodes`` successful expert episodes to the store ``out`` (atomically).

    An interrupted run leaves ``<out>.partial``; running again with the same config resumes it.
    ``out`` is locked before anything is built: a second writer fails at once (``wait``: waits).
    """
    with OutputLock(out, wait):
        EpisodeWriter.check_target(Path(out), overwrite)
        return _generate(cfg, out, overwrite, resume)


def _generate(cfg: DemoConfig, out: str | Path, overwrite: bool, resume: bool) -> EpisodeStore:
    env = make_env(cfg.suite, cfg.task, obs=cfg.obs, max_episode_steps=cfg.max_episode_steps)
    expert = make_expert(cfg.suite, cfg.task)
    space = env.action_space
    meta = StoreMeta(
        task=cfg.task,
        suite=cfg.suite,
        source=f"{cfg.suite}-expert",
        obs_kinds=env.obs_kinds,
        action_low=[float(x) for x in space.low],
        action_high=[float(x) for x in space.high],
        control_mode=env.control_mode,
        params=asdict(cfg),
    )
    seeds = cfg.attempt_seeds()
    try:
        with EpisodeStore.create(
            out, meta, zarr_format=cfg.zarr_format, overwrite=overwrite, resume=resume
        ) as writer:
            bar = tqdm(total=cfg.episodes, initial=writer.n_episodes, desc=f"demos {cfg.task}", unit="ep")
            for seed in seeds[writer.meta.n_attempts :]:
                if writer.n_episodes >= cfg.episodes:
                    break
                ep = run_episode(env, expert, seed, record=True)
                if ep.success:
                    writer.add_episode({**ep.obs, ACTION_KEY: ep.actions}, seed)
                    bar.update(1)
                else:
                    writer.skip_episode(seed)
                    log.info("expert failed on seed %d after %d steps; not kept", seed, ep.steps)
                bar.set_postfix(tried=writer.meta.n_attempts)
            bar.close()
            if writer.n_episodes < cfg.episodes:
                writer.discard()
                raise RuntimeError(
                    f"{out}: the {cfg.suite} expert succeeded in only {writer.n_episodes} of "
                    f"{writer.meta.n_attempts} attempts on {cfg.task}; {cfg.episodes} were asked "
                    f"(raise max_attempts or max_episode_steps)"
                )
    finally:
        env.close()
    return EpisodeStore(out, check_values=False)
