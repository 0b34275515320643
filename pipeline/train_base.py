"""The ``train-base`` stage: train a base policy on a demo store, or import an existing checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from difftori.base_policies import POLICIES, ShapeMeta, load_policy, make_policy
from difftori.base_policies.checkpoint import CheckpointError
from difftori.base_policies.configs import config_to_dict
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.safeio import OutputLock
from difftori.datasets.windows import WindowDataset
from difftori.pipeline.rollouts import RolloutCallback, RolloutConfig
from difftori.pipeline.training import LitTrainer, TrainConfig, fit, run_state, save_trained

log = logging.getLogger(__name__)
# The code whose version a resumed base-policy training must share with the interrupted one.
TRAINING_CODE = (
    "difftori.base_policies",
    "difftori.datasets",
    "difftori.pipeline.training",
    "difftori.pipeline.train_base",
)


def split_episodes(n: int, val_episodes: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of episode indices into (train, validation); at least one training episode."""
    val_episodes = min(val_episodes, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[val_episodes:].tolist()), sorted(order[:val_episodes].tolist())


def store_split(store: EpisodeStore, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """The store's own ``train``/``valid`` split when it has one (a robomimic file's masks),
    otherwise a seeded split holding out ``cfg.val_episodes`` episodes."""
    splits = store.meta.splits
    if "train" in splits and "valid" in splits:
        log.info("%s: using the store's own train/valid split", store.path)
        return list(splits["train"]), list(splits["valid"])
    return split_episodes(store.n_episodes, cfg.val_episodes, cfg.seed)


def train_base(
    task: str,
    policy_name: str,
    demos: Path,
    out: Path,
    policy_config: dict[str, Any] | None,
    cfg: TrainConfig,
    progress: bool = True,
    logs: Path | None = None,
    split: tuple[list[int], list[int]] | None = None,
    restart: bool = False,
    wait: bool = False,
) -> dict[str, Any]:
    """Train ``policy_name`` on ``demos`` and save it to ``out``; returns the training summary.

    ``split`` = (train, validation) episodes, default the seeded :func:`split_episodes`.
    Lightning state lives in ``<out>.work`` while training (an interrupted run resumes from it,
    if its settings, data and code are the same; ``restart`` discards it) and is removed once
    ``out`` is written. The demos' checksums are verified first; ``out`` is locked throughout
    (``wait``: queue behind another writer instead of failing).
    """
    with OutputLock(out, wait):
        store = EpisodeStore(demos)
        data = store.verify()
        return _train_base(
            task, policy_name, store, data, out, policy_config, cfg, progress, logs, split, restart
        )


def _train_base(
    task: str,
    policy_name: str,
    store: EpisodeStore,
    data_digest: str,
    out: Path,
    policy_config: dict[str, Any] | None,
    cfg: TrainConfig,
    progress: bool,
    logs: Path | None,
    split: tuple[list[int], list[int]] | None,
    restart: bool,
) -> dict[str, Any]:
    demos = store.path
    L.seed_everything(cfg.seed, verbose=False)  # before building: initial weights are seeded too
    policy = make_policy(policy_name, policy_config, ShapeMeta.from_store(store))
    train_eps, val_eps = split or store_split(store, cfg)
    horizon, n_obs_steps = policy.train_window()  # a recurrent policy trains on sequences
    windows = dict(obs_keys=policy.obs_keys, horizon=horizon, n_obs_steps=n_obs_steps)
    train = WindowDataset(store, episodes=train_eps, **windows)
    val = WindowDataset(store, episodes=val_eps, **windows) if val_eps else None
    policy.fit_normalizer(train.arrays())
    log.info(
        "training %s on %s: %d train episodes (%d windows), %d validation episodes, %d parameters",
        policy_name,
        task,
        len(train_eps),
        len(train),
        len(val_eps),
        sum(p.numel() for p in policy.parameters()),
    )
    lit = LitTrainer(policy, cfg)
    work = out.with_name(out.name + ".work")
    callbacks = rollout_callbacks(demos, cfg)
    model = {"policy": policy_name, "config": config_to_dict(policy.config)}
    split = (train_eps, val_eps)
    state = run_state(task, model, cfg, split, {"demos": data_digest}, TRAINING_CODE)
    summary = fit(lit, train, val, work, progress=progress, callbacks=callbacks, state=state, restart=restart)
    if callbacks:
        summary["rollouts"] = callbacks[0].history
    summary |= {"train_episodes": train_eps, "val_episodes": val_eps}
    info = {
        "task": task,
        "demos": str(demos),
        "demos_episode_seeds": store.meta.episode_seeds,
        "train_config": asdict(cfg),
        "summary": summary,
    }
    if save_trained(lit, work, out, info, logs):
        log.info("saved %s: %s", out, json.dumps({k: v for k, v in summary.items() if k != "metrics"}))
    return summary


def rollout_callbacks(demos: Path, cfg: TrainConfig, wrap: Any = None) -> list[RolloutCallback]:
    """The closed-loop rollout callback when ``cfg.rollout_every_steps`` asks for one."""
    if not cfg.rollout_every_steps:
        return []
    rollout = RolloutConfig(cfg.rollout_every_steps, cfg.rollout_episodes, cfg.rollout_seed)
    return [RolloutCallback(demos, rollout, wrap)]


def import_checkpoint(src: Path, out: Path, policy_name: str, demos: Path, wait: bool = False) -> None:
    """Use an existing checkpoint instead of training: validate it (weights hashes included)
    against the demos and copy it, holding ``out``'s lock."""
    with OutputLock(out, wait):
        _import_checkpoint(src, out, policy_name, demos)


def _import_checkpoint(src: Path, out: Path, policy_name: str, demos: Path) -> None:
    """A checkpoint directory is copied; a file another project wrote (robomimic's ``.pth`` for
    ``bc_rnn``) is converted into one of ours."""
    policy = load_policy(src) if src.is_dir() else POLICIES.get_class(policy_name).import_file(src)
    if policy.name != policy_name:
        raise CheckpointError(f"{src}: holds a '{policy.name}' policy, expected '{policy_name}'")
    store_meta = ShapeMeta.from_store(EpisodeStore(demos, check_values=False))
    if policy.shape_meta.action_dim != store_meta.action_dim:
        raise CheckpointError(
            f"{src}: acts in {policy.shape_meta.action_dim} dims, {demos}: action has {store_meta.action_dim}"
        )
    have = store_meta.obs
    for key in policy.obs_keys:
        if key not in have or list(have[key]["shape"]) != list(policy.shape_meta.obs[key]["shape"]):
            raise CheckpointError(
                f"{src}: observation '{key}' {policy.shape_meta.obs[key]} does not match "
                f"{demos}: {have.get(key)}"
            )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        policy.save(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("imported %s -> %s", src, out)
