"""Closed-loop success during training: a Lightning callback that rolls the EMA policy out.

Every ``every_steps`` optimiser steps (and at the last step) the callback copies the EMA weights
into the module, runs ``episodes`` episodes of the in-memory policy in the demos' own env (built
from the demo store's metadata, exactly as ``difftori evaluate`` builds it) and logs
``rollout/success_rate``, ``rollout/return`` (mean episode return) and ``rollout/fit_time_s``
(training wall time so far, rollouts excluded) at that step, so ``dvc plots show`` draws success
against steps and time.

The episode seeds are *validation* seeds: drawn from ``seed`` with the demo seeds excluded, and
from a different stream than ``evaluate.seed``'s, so choosing a budget or a task from these
curves never looks at the episodes the final tables report. Rollouts touch no global RNG (torch,
numpy and Python states are restored), so they never change the training trajectory; the
checkpoint that is saved and evaluated is still the final one.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from difftori.datasets.episode_store import EpisodeStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutConfig:
    """When and how much to roll out during training (params ``train_base.rollout_*``)."""

    every_steps: int
    episodes: int
    seed: int = 7  # validation episodes; evaluation draws from evaluate.seed instead
    envs: int = 8  # envs stepped together, one policy call for all of them


class RolloutCallback(L.Callback):
    """Logs the EMA policy's closed-loop success rate every ``cfg.every_steps`` steps.

    ``wrap`` turns the trained module into the policy to roll out (default: the module itself;
    a refiner is wrapped with its frozen base). The step limit is the demos' own.
    """

    def __init__(self, demos: Path, cfg: RolloutConfig, wrap: Callable[[Any], Any] | None = None) -> None:
        from difftori.eval.evaluate import episode_seeds  # the simulator side loads only when asked

        if cfg.every_steps < 1 or cfg.episodes < 1 or cfg.envs < 1:
            raise ValueError(f"invalid rollout config {cfg}")
        self.cfg, self.wrap = cfg, wrap or (lambda module: module)
        meta = EpisodeStore(demos, check_values=False).meta
        self.meta, self.max_episode_steps = meta, int(meta.params.get("max_episode_steps", 200))
        self.seeds = episode_seeds(cfg.seed, cfg.episodes, exclude=set(meta.episode_seeds))
        self._envs: list[Any] = []
        self._rollout_s = 0.0
        self._start = 0.0
        self.history: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._rollout_s = time.perf_counter(), 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.cfg.every_steps and step != trainer.max_steps):
            return  # under DDP, rank 0 rolls out
        started = time.perf_counter()
        train_time = started - self._start - self._rollout_s
        rate, ret = self.rollout(pl_module)
        self._rollout_s += time.perf_counter() - started
        row = {
            "rollout/success_rate": rate,
            "rollout/return": ret,
            "rollout/fit_time_s": round(train_time, 1),
        }
        self.history.append({"step": step, **row})
        if trainer.logger is not None:
            trainer.logger.log_metrics(row, step=step)
        log.info("step %d: rollout success %.1f%% over %d episodes", step, 100 * rate, len(self.seeds))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for env in self._envs:
            env.close()
        self._envs = []

    @torch.no_grad()
    def rollout(self, pl_module: L.LightningModule) -> tuple[float, float]:
        """Success rate and mean return of the (wrapped) module with its EMA weights over the
        validation seeds."""
        from difftori.eval.evaluate import make_eval_env, run_policy_episodes
        from difftori.eval.rollout import envs_for

        module, ema = pl_module.module, getattr(pl_module, "ema", None)
        policy = self.wrap(module)
        if not self._envs:
            n = envs_for(policy, min(self.cfg.envs, len(self.seeds)))
            self._envs = [
                make_eval_env(self.meta, self.max_episode_steps, policy.n_obs_steps, policy.obs_keys)
                for _ in range(n)
            ]
        if ema is not None:
            ema.store(module.parameters())
            ema.copy_to(module.parameters())
        was_training = module.training
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            module.eval()
            with torch.random.fork_rng(devices=[]):
                records = run_policy_episodes(self._envs, policy, list(enumerate(self.seeds)))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
            module.train(was_training)
            if ema is not None:
                ema.restore(module.parameters())
        done = [r for r in records if r.status == "ok"]
        n = max(1, len(done))
        return sum(r.success for r in done) / n, sum(r.ret for r in done) / n
