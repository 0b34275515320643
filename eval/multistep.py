"""Observation history and action-chunk execution: the one wrapper every suite's env goes through.

``MultiStepWrapper(env, n_obs_steps=To)`` turns a per-step env into the policy contract's view:

* observations are ``{key: (To, ...)}``, the last ``To`` steps, oldest first; after ``reset`` the
  first observation is repeated (as diffusion_policy and DP3 do, and as the training windows pad);
* ``step(actions)`` takes an action chunk ``(Ta, Da)`` and executes it one action at a time,
  stopping early when the episode terminates (success) or is truncated (step limit); the reward is
  summed, and ``info["success"]`` is true if any executed step succeeded;
* ``info["steps"]`` counts the env steps executed by this call;
* with ``record_frames = True``, ``frames`` collects ``env.render()`` after reset and every step
  (for videos).

``lazy=True`` (evaluation) skips observations no policy will see. Of a chunk of ``Ta`` actions only
the observations after its last ``To`` steps stay in the history (after reset the history is the
reset observation repeated, and each chunk starts from a history whose frames were all observed),
so the first ``Ta - To`` steps of each chunk run with ``env.unwrapped.observe = False`` where the
env has that switch (it then renders nothing). The observation returned after such a chunk
is bit-identical to the eager one. A step that ends the episode (terminated or truncated, possibly
mid-chunk) returns an empty observation ``{}`` in lazy mode: no policy acts on it, and its history
may hold skipped frames.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np


class MultiStepWrapper(gym.Wrapper):
    """Stack the last ``n_obs_steps`` observations; execute a ``(Ta, Da)`` action chunk per step."""

    def __init__(self, env: gym.Env, n_obs_steps: int, lazy: bool = False) -> None:
        super().__init__(env)
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = n_obs_steps
        self.lazy = lazy
        self._can_skip = hasattr(env.unwrapped, "observe")
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)
        self.record_frames = False
        self.frames: list[np.ndarray] = []
        spaces = env.observation_space.spaces  # type: ignore[attr-defined]
        self.observation_space = gym.spaces.Dict(
            {
                k: gym.spaces.Box(
                    np.repeat(s.low[None], n_obs_steps, 0),
                    np.repeat(s.high[None], n_obs_steps, 0),
                    dtype=s.dtype,
                )
                for k, s in spaces.items()
            }
        )

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._history.clear()
        self._history.extend([obs] * self.n_obs_steps)
        self.frames = [self.env.render()] if self.record_frames else []
        return self._stacked(), info

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        actions = np.asarray(actions)
        if actions.ndim != 2:
            raise ValueError(f"expected an action chunk (Ta, Da), got shape {actions.shape}")
        total, success, terminated, truncated, steps = 0.0, False, False, False, 0
        info: dict[str, Any] = {}
        skip = len(actions) - self.n_obs_steps if self.lazy and self._can_skip else 0
        try:
            for action in actions:
                if skip > 0:
                    self.env.unwrapped.observe = steps >= skip  # type: ignore[attr-defined]
                obs, reward, terminated, truncated, info = self.env.step(action)
                self._history.append(obs)
                if self.record_frames:
                    self.frames.append(self.env.render())
                total += float(reward)
                steps += 1
                success = success or bool(info.get("success", False))
                if terminated or truncated:
                    break
        finally:
            if skip > 0:
                self.env.unwrapped.observe = True  # type: ignore[attr-defined]
        stacked = {} if self.lazy and (terminated or truncated) else self._stacked()
        return stacked, total, terminated, truncated, {**info, "success": success, "steps": steps}

    def _stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack([o[k] for o in self._history]) for k in self._history[0]}
