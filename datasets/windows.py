"""Training windows over an episode store, diffusion_policy style.

A sample is anchored at a dataset step ``t`` (the current step). With ``n_obs_steps`` To and
``horizon`` H it holds the observations of steps ``t-To+1 .. t`` and the actions of steps
``t-To+1 .. t-To+H``; indices outside the episode repeat its first or last step. A policy
executes the actions at window positions ``To-1 .. To-1+Ta`` (Ta = ``n_action_steps``).
Every step of every selected episode is one sample, in store order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore, StoreError


def window_indices(
    t: np.ndarray, start: np.ndarray, end: np.ndarray, n_obs_steps: int, horizon: int
) -> np.ndarray:
    """Global step indices (N, H) of the windows anchored at global steps ``t``, clipped to episodes."""
    offsets = np.arange(horizon) - (n_obs_steps - 1)
    return np.clip(t[:, None] + offsets[None], start[:, None], end[:, None] - 1)


class WindowDataset(torch.utils.data.Dataset):
    """``{"obs": {key: (To, ...)}, "action": (H, Da)}`` samples from chosen episodes, held in memory."""

    def __init__(
        self,
        store: EpisodeStore,
        obs_keys: Sequence[str],
        horizon: int,
        n_obs_steps: int,
        episodes: Sequence[int] | None = None,
    ) -> None:
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"need 1 <= n_obs_steps ({n_obs_steps}) <= horizon ({horizon})")
        missing = [k for k in obs_keys if k not in store.meta.obs_kinds]
        if missing:
            raise StoreError(
                f"{store.path}: data/{missing[0]}: the policy needs observation key '{missing[0]}' "
                f"but the store has only {sorted(store.meta.obs_kinds)}"
            )
        self.obs_keys = list(obs_keys)
        self.horizon, self.n_obs_steps = horizon, n_obs_steps
        self.episodes = list(range(store.n_episodes) if episodes is None else episodes)
        self.data = {k: np.asarray(store.array(k)[:]) for k in [*self.obs_keys, ACTION_KEY]}
        ends = store.episode_ends
        starts = np.concatenate([[0], ends[:-1]])
        t, s, e = [], [], []
        for ep in self.episodes:
            steps = np.arange(starts[ep], ends[ep])
            t.append(steps)
            s.append(np.full_like(steps, starts[ep]))
            e.append(np.full_like(steps, ends[ep]))
        self.steps = np.concatenate(t)  # global step of each sample's anchor
        self.indices = window_indices(self.steps, np.concatenate(s), np.concatenate(e), n_obs_steps, horizon)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> dict:
        idx = self.indices[i]
        obs = {k: torch.from_numpy(self.data[k][idx[: self.n_obs_steps]]) for k in self.obs_keys}
        return {"obs": obs, "action": torch.from_numpy(self.data[ACTION_KEY][idx])}

    def arrays(self) -> dict[str, np.ndarray]:
        """The selected episodes' raw steps per key (for fitting a normaliser)."""
        return {k: v[self.steps] for k, v in self.data.items()}


class InitActionWindows(torch.utils.data.Dataset):
    """Window samples plus the K stored base-policy windows for the same anchor step:
    ``{"obs", "action", "init_action": (K, H, Da)}`` (refiner training)."""

    def __init__(self, windows: WindowDataset, init_actions: np.ndarray) -> None:
        if init_actions.shape[2] != windows.horizon:
            raise ValueError(f"init actions have horizon {init_actions.shape[2]}, windows {windows.horizon}")
        self.windows = windows
        self.init_actions = np.asarray(init_actions, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        item = self.windows[i]
        item["init_action"] = torch.from_numpy(self.init_actions[self.windows.steps[i]])
        return item
