"""The ``init-actions`` stage: sample a frozen base policy's action window at every demo step.

Refiners train on these windows. Plain (``cross_fit: 0``), every window comes from the base
checkpoint, which trained on most of these episodes, so on them it is nearly perfect (measured:
refiner train loss 0.02 against 0.09 held out) and refiners learn to change little. Cross-fitted
(``cross_fit: k``), the training episodes of the base are split into k folds; k fold bases are
trained, each without one fold (same policy and training config, same validation episodes), and
every fold's windows come from the base that never saw it, like the windows a refiner meets at test
time. The validation episodes' windows come from the checkpoint itself (it never saw them either).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from difftori.base_policies import load_policy
from difftori.base_policies.base import BasePolicy
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.init_action_store import InitActionStore, InitMeta
from difftori.datasets.windows import WindowDataset
from difftori.pipeline.train_base import train_base
from difftori.pipeline.training import TrainConfig
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitActionsConfig:
    """params.yaml ``init_actions``."""

    samples: int = 4  # K base-policy windows per demo step
    seed: int = 0  # sampling seed (the stage adds the training seed k)
    batch_size: int = 256
    weights: str = "ema"
    cross_fit: int = 0  # k >= 2: windows of each fold from a base trained without that fold

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"samples and batch_size must be >= 1 in {self}")
        if self.cross_fit == 1 or self.cross_fit < 0:
            raise ValueError(f"cross_fit must be 0 (off) or >= 2 folds, got {self.cross_fit}")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {self.weights!r}")


def sample_windows(
    policy: BasePolicy, data: WindowDataset, samples: int, gen: torch.Generator, batch_size: int
) -> np.ndarray:
    """``samples`` windows of ``policy`` for every item of ``data``: (len(data), K, H, Da)."""
    per_batch = max(1, batch_size // samples)
    loader = torch.utils.data.DataLoader(data, batch_size=per_batch, shuffle=False)
    chunks = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"init-actions {policy.name}", unit="batch"):
            obs = {k: v.repeat_interleave(samples, dim=0) for k, v in batch["obs"].items()}
            pred = policy.predict_action_chunk(obs, gen)
            chunks.append(pred.reshape(-1, samples, *pred.shape[1:]).numpy())
    return np.concatenate(chunks)


def sample_windows_in_order(
    policy: BasePolicy, data: WindowDataset, samples: int, gen: torch.Generator, starts: set[int]
) -> np.ndarray:
    """A recurrent ``policy``'s windows as a rollout meets them: (len(data), K, H, Da).

    ``data``'s steps are walked in store order, ``reset()`` at each episode start (a global step
    in ``starts``), the K samples of a step as K batch rows, so the state at step t has seen the
    episode's steps 0..t, one call each.
    """
    rows = []
    with torch.no_grad():
        for i in tqdm(range(len(data)), desc=f"init-actions {policy.name} (in order)", unit="step"):
            if int(data.steps[i]) in starts:
                policy.reset()
            obs = {k: v[None].repeat_interleave(samples, dim=0) for k, v in data[i]["obs"].items()}
            rows.append(policy.predict_action_chunk(obs, gen).numpy())
    return np.stack(rows)


def compute_init_actions(
    demos: Path,
    model: Path,
    out: Path,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    weights: str = "ema",
    folds: list[tuple[Path, list[int]]] | None = None,
) -> InitActionStore:
    """Run the frozen base (eval mode, no grad) over every step of ``demos``; keep ``samples`` windows.

    Row ``t`` of the result holds ``samples`` action windows (H, Da) for the observation window
    anchored at step ``t`` (the policy's inference window; a recurrent policy walks each episode in
    order, :func:`sample_windows_in_order`). ``folds`` (cross-fitting)
    maps checkpoints to the episodes whose windows they produce; the other episodes' windows come
    from ``model``. Deterministic given ``seed``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    store = EpisodeStore(demos)
    policy = load_policy(model, weights=weights)
    window = dict(obs_keys=policy.obs_keys, horizon=policy.horizon, n_obs_steps=policy.n_obs_steps)
    folds = folds or []
    covered = {e for _, eps in folds for e in eps}
    rest = [e for e in range(store.n_episodes) if e not in covered]
    actions = np.zeros((store.n_steps, samples, policy.horizon, store.meta.action_dim), np.float32)
    gen = torch.Generator().manual_seed(seed)
    for path, episodes in [(model, rest), *folds]:
        if not episodes:
            continue
        data = WindowDataset(store, episodes=episodes, **window)
        sampler = policy if path == model else load_policy(path, weights=weights)
        if sampler.recurrent:
            starts = {0, *(int(e) for e in store.episode_ends[:-1])}
            actions[data.steps] = sample_windows_in_order(sampler, data, samples, gen, starts)
        else:
            actions[data.steps] = sample_windows(sampler, data, samples, gen, batch_size)
    meta = InitMeta(
        demos=str(demos),
        policy=policy.name,
        checkpoint=str(model),
        weights=policy.weights,
        samples=samples,
        horizon=policy.horizon,
        n_obs_steps=policy.n_obs_steps,
        n_action_steps=policy.n_action_steps,
        seed=seed,
        demos_episode_seeds=store.meta.episode_seeds,
        folds=[sorted(eps) for _, eps in folds],
    )
    InitActionStore.write(out, actions, store.episode_ends, meta)
    log.info("wrote %s: %s (%s weights, %d cross-fit folds)", out, actions.shape, policy.weights, len(folds))
    return InitActionStore(out)


def fold_split(episodes: list[int], k: int, seed: int) -> list[list[int]]:
    """``episodes`` split into ``k`` folds (as equal as possible) by a seeded permutation."""
    if not 2 <= k <= len(episodes):
        raise ValueError(f"cross_fit {k}: needs 2 <= k <= the {len(episodes)} training episodes")
    order = np.random.default_rng([seed, 0xF01D]).permutation(episodes)
    return [sorted(int(e) for e in part) for part in np.array_split(order, k)]


def train_fold_bases(
    task: str,
    demos: Path,
    model: Path,
    work: Path,
    k: int,
    policy_config: dict[str, Any] | None,
    cfg: TrainConfig,
    progress: bool = True,
) -> list[tuple[Path, list[int]]]:
    """Train the ``k`` cross-fitting bases of ``model`` under ``work`` (each resumes or is reused
    if already there); returns (checkpoint, held-out fold) pairs."""
    base = load_policy(model)
    summary = base.info.get("summary", {})
    if "train_episodes" not in summary:
        raise ValueError(f"{model}/config.json: info.summary.train_episodes: needed for cross-fitting")
    train_eps, val_eps = summary["train_episodes"], summary["val_episodes"]
    cfg = dataclasses.replace(cfg, rollout_every_steps=0)
    folds = []
    for j, fold in enumerate(fold_split(train_eps, k, cfg.seed)):
        out = work / f"fold{j}"
        if not (out / "config.json").exists():
            keep = [e for e in train_eps if e not in fold]
            log.info("cross-fit base %d/%d: training without episodes %s", j + 1, k, fold)
            train_base(task, base.name, demos, out, policy_config, cfg, progress, split=(keep, val_eps))
        folds.append((out, fold))
    return folds


def init_actions_stage(
    task: str,
    demos: Path,
    model: Path,
    out: Path,
    cfg: InitActionsConfig,
    seed: int,
    policy_config: dict[str, Any] | None = None,
    train_cfg: TrainConfig | None = None,
) -> InitActionStore:
    """The stage: (cross-fitted, if ``cfg.cross_fit``) init actions of ``model`` into ``out``.

    Fold bases live in ``<out>.work/`` until the store is written, so an interrupted run resumes.
    """
    folds = None
    work = out.with_name(out.name + ".work")
    if cfg.cross_fit:
        if train_cfg is None:  # the fold bases must train as the checkpoint did, never on defaults
            raise ValueError("init_actions.cross_fit needs the base's training config (train_base)")
        folds = train_fold_bases(task, demos, model, work, cfg.cross_fit, policy_config, train_cfg)
    store = compute_init_actions(
        demos, model, out, cfg.samples, cfg.seed + seed, cfg.batch_size, cfg.weights, folds
    )
    shutil.rmtree(work, ignore_errors=True)
    return store
