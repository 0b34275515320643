"""Demo generation: each suite writes its demo store (``Suite.write_demos``); a scripted-expert
suite records its expert through the suite's env with :func:`record_expert_demos`.

Only successful episodes are kept; the store records how many were tried and the seed of each
kept episode. Attempt seeds are drawn from ``seed``, so the same config gives the same demos.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from difftori.base_policies.configs import config_from_dict
from difftori.datasets.episode_store import EpisodeStore, EpisodeWriter, StoreMeta
from difftori.datasets.safeio import OutputLock
from difftori.eval.multistep import MultiStepWrapper
from difftori.eval.rollout import Act, ExpertPolicy, run_policy_episodes
from difftori.eval.suites import get_suite
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
    max_episode_steps: int = 0  # 0: the suite's limit for the task
    obs: dict[str, Any] = field(default_factory=dict)  # the suite's observation options (its obs_config)
    zarr_format: int = 2

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.max_attempts and self.max_attempts < self.episodes:
            raise ValueError(f"max_attempts ({self.max_attempts}) < episodes ({self.episodes})")
        if self.max_episode_steps < 0:
            raise ValueError(
                f"max_episode_steps must be >= 0 (0: the suite default), got {self.max_episode_steps}"
            )
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
    """Write ``cfg.episodes`` demos of ``cfg.suite``'s ``cfg.task`` to the store ``out`` (atomically).

    An interrupted run leaves ``<out>.partial``; running again with the same config resumes it.
    ``out`` is locked before anything is built: a second writer fails at once (``wait``: waits).
    The suite's observation options are validated and a step limit of 0 becomes the suite's.
    """
    suite = get_suite(cfg.suite)
    config_from_dict(suite.obs_config, cfg.obs, f"demos.obs for suite {cfg.suite}")
    if cfg.task not in suite.tasks():
        raise ValueError(f"unknown {cfg.suite} task {cfg.task!r}; valid tasks: {', '.join(suite.tasks())}")
    if not cfg.max_episode_steps:
        cfg = replace(cfg, max_episode_steps=suite.max_episode_steps(cfg.task))
    with OutputLock(out, wait):
        EpisodeWriter.check_target(Path(out), overwrite)
        return suite.write_demos(cfg, Path(out), overwrite, resume)


def record_expert_demos(
    cfg: DemoConfig, out: Path, env: Any, expert: Act, overwrite: bool, resume: bool
) -> EpisodeStore:
    """Roll ``expert`` out in ``env`` (a suite env) from each attempt seed, through the evaluation
    runner, keeping successful episodes until ``cfg.episodes``; closes ``env``."""
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
    policy = ExpertPolicy(expert, list(env.obs_kinds), space.low, space.high)
    envs = [MultiStepWrapper(env, n_obs_steps=1)]
    try:
        with EpisodeStore.create(
            out, meta, zarr_format=cfg.zarr_format, overwrite=overwrite, resume=resume
        ) as writer:
            bar = tqdm(total=cfg.episodes, initial=writer.n_episodes, desc=f"demos {cfg.task}", unit="ep")
            for seed in cfg.attempt_seeds()[writer.meta.n_attempts :]:
                if writer.n_episodes >= cfg.episodes:
                    break
                steps: dict[int, dict[str, Any]] = {}
                (record,) = run_policy_episodes(envs, policy, [(0, seed)], trajectories=steps)
                if record.success:
                    writer.add_episode(steps[0], seed)
                    bar.update(1)
                else:
                    writer.skip_episode(seed)
                    log.info("expert failed on seed %d after %d steps; not kept", seed, record.steps)
                bar.set_postfix(tried=writer.meta.n_attempts)
            bar.close()
            _check_enough(cfg, out, writer)
    finally:
        env.close()
    return EpisodeStore(out, check_values=False)


def _check_enough(cfg: DemoConfig, out: Path, writer: EpisodeWriter) -> None:
    if writer.n_episodes < cfg.episodes:
        writer.discard()
        raise RuntimeError(
            f"{out}: the {cfg.suite} expert succeeded in only {writer.n_episodes} of "
            f"{writer.meta.n_attempts} attempts on {cfg.task}; {cfg.episodes} were asked "
            f"(raise max_attempts or max_episode_steps)"
        )
