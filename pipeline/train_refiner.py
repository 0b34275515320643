"""The ``train-refiner`` stage: train a refiner on demos + the frozen base's stored init actions."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from difftori.base_policies import ShapeMeta
from difftori.base_policies.checkpoint import read_checkpoint
from difftori.base_policies.configs import config_to_dict
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.init_action_store import InitActionStore
from difftori.datasets.safeio import OutputLock, array_sha256
from difftori.datasets.windows import InitActionWindows, WindowDataset
from difftori.pipeline.train_base import TRAINING_CODE, rollout_callbacks, split_episodes
from difftori.pipeline.training import LitTrainer, TrainConfig, fit, run_state, save_trained
from difftori.refiners import REFINERS

log = logging.getLogger(__name__)


def base_split(inits: InitActionStore, n_episodes: int, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """The base policy's own train/validation split (from its checkpoint), so that the refiner's
    held-out episodes are held out for the base too; a fresh seeded split if unavailable."""
    try:
        summary = read_checkpoint(inits.meta.checkpoint, "base_policy").info["summary"]
        return summary["train_episodes"], summary["val_episodes"]
    except (ValueError, KeyError, OSError):
        return split_episodes(n_episodes, cfg.val_episodes, cfg.seed)


def refiner_rollouts(demos: Path, base: str, weights: str, cfg: TrainConfig) -> list[Any]:
    """Rollout callbacks (``cfg.rollout_every_steps``) of the refiner on its frozen base."""
    if not cfg.rollout_every_steps:
        return []
    from difftori.base_policies import load_policy
    from difftori.refiners import RefinedPolicy

    frozen = load_policy(base, weights).eval()
    return rollout_callbacks(demos, cfg, wrap=lambda refiner: RefinedPolicy(frozen, refiner))


def train_refiner(
    task: str,
    refiner_name: str,
    demos: Path,
    inits_path: Path,
    out: Path,
    refiner_config: dict[str, Any] | None,
    cfg: TrainConfig,
    progress: bool = True,
    logs: Path | None = None,
    restart: bool = False,
    wait: bool = False,
) -> dict[str, Any]:
    """Train ``refiner_name`` and save it to ``out``; returns the training summary.

    ``refiner_config["type"]`` names the registered refiner when ``refiner_name`` is a variant
    (e.g. ``ibc_alone: {type: ibc, init: uniform}``); otherwise ``refiner_name`` is the type.
    As :func:`~difftori.pipeline.train_base.train_base`: demos verified, ``out`` locked, resume
    state checked (``restart`` discards it).
    """
    with OutputLock(out, wait):
        return _train_refiner(
            task, refiner_name, demos, inits_path, out, refiner_config, cfg, progress, logs, restart
        )


def _train_refiner(
    task: str,
    refiner_name: str,
    demos: Path,
    inits_path: Path,
    out: Path,
    refiner_config: dict[str, Any] | None,
    cfg: TrainConfig,
    progress: bool,
    logs: Path | None,
    restart: bool,
) -> dict[str, Any]:
    store = EpisodeStore(demos)
    data_digest = store.verify()
    inits = InitActionStore(inits_path)
    inits.check_aligned(store)
    window = {"horizon": inits.meta.horizon, "n_obs_steps": inits.meta.n_obs_steps}
    config = dict(refiner_config or {}) | window | {"n_action_steps": inits.meta.n_action_steps}
    kind = config.pop("type", refiner_name)
    L.seed_everything(cfg.seed, verbose=False)
    refiner = REFINERS.make(kind, config, ShapeMeta.from_store(store))
    train_eps, val_eps = base_split(inits, store.n_episodes, cfg)
    init_actions = inits.actions[:]

    def data(episodes: list[int]) -> InitActionWindows:
        return InitActionWindows(
            WindowDataset(store, refiner.obs_keys, episodes=episodes, **window), init_actions
        )

    train, val = data(train_eps), (data(val_eps) if val_eps else None)
    raw = train.windows.arrays()
    raw["action"] = np.concatenate(
        [raw["action"], init_actions[train.windows.steps].reshape(-1, raw["action"].shape[-1])]
    )
    refiner.fit_normalizer(raw)
    log.info(
        "training %s on %s (base %s, %s weights): %d train / %d validation episodes, %d parameters",
        refiner_name,
        task,
        inits.meta.policy,
        inits.meta.weights,
        len(train_eps),
        len(val_eps),
        sum(p.numel() for p in refiner.parameters()),
    )
    lit = LitTrainer(refiner, cfg)
    work = out.with_name(out.name + ".work")
    model = {"refiner": kind, "config": config_to_dict(refiner.config)}
    data_digests = {"demos": data_digest, "init_actions": array_sha256(init_actions)}
    code = (*TRAINING_CODE, "difftori.refiners", "difftori.pipeline.train_refiner")
    state = run_state(task, model, cfg, (train_eps, val_eps), data_digests, code)
    callbacks = refiner_rollouts(demos, inits.meta.checkpoint, inits.meta.weights, cfg)
    summary = fit(lit, train, val, work, progress=progress, state=state, restart=restart, callbacks=callbacks)
    summary |= {"train_episodes": train_eps, "val_episodes": val_eps}
    if callbacks:
        summary["rollouts"] = callbacks[0].history
    if hasattr(refiner, "cholesky_failures"):
        summary["cholesky_failures"] = int(refiner.cholesky_failures)
    info = {
        "task": task,
        "base_policy": inits.meta.policy,
        "base_checkpoint": inits.meta.checkpoint,
        "demos": str(demos),
        "init_actions": str(inits_path),
        "train_config": asdict(cfg),
        "summary": summary,
    }
    if save_trained(lit, work, out, info, logs):
        log.info("saved %s: %s", out, json.dumps(summary["metrics"]))
    return summary
