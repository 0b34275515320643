"""The ``init-actions`` stage: sample a frozen base policy's action window at every demo step."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from difftori.base_policies import load_policy
from difftori.datasets.episode_store import EpisodeStore
from difftori.datasets.init_action_store import InitActionStore, InitMeta
from difftori.datasets.windows import WindowDataset
from tqdm import tqdm

log = logging.getLogger(__name__)


def compute_init_actions(
    demos: Path,
    model: Path,
    out: Path,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    weights: str = "ema",
) -> InitActionStore:
    """Run the frozen base (eval mode, no grad) over every step of ``demos``; keep ``samples`` windows.

    Row ``t`` of the result holds ``samples`` action windows (H, Da) for the observation window
    anchored at step ``t`` (the same windows the policy trained on). Deterministic given ``seed``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    store = EpisodeStore(demos)
    policy = load_policy(model, weights=weights)
    data = WindowDataset(store, policy.obs_keys, policy.horizon, policy.n_obs_steps)
    per_batch = max(1, batch_size // samples)
    loader = torch.utils.data.DataLoader(data, batch_size=per_batch, shuffle=False)
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"init-actions {policy.name}", unit="batch"):
            obs = {k: v.repeat_interleave(samples, dim=0) for k, v in batch["obs"].items()}
            pred = policy.predict_action_chunk(obs, gen)
            chunks.append(pred.reshape(-1, samples, *pred.shape[1:]).numpy())
    actions = np.concatenate(chunks)
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
    )
    InitActionStore.write(out, actions, store.episode_ends, meta)
    log.info("wrote %s: %s from %s weights", out, actions.shape, policy.weights)
    return InitActionStore(out)
