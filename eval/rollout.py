"""Running one episode of a policy (or scripted expert) in an env, optionally recording it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

Act = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class Episode:
    """One finished episode. ``obs[k][t]`` is what the policy saw before taking ``actions[t]``."""

    seed: int
    success: bool
    steps: int
    ret: float
    wall_s: float
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    actions: np.ndarray | None = None


def run_episode(env: gym.Env, act: Act, seed: int, *, record: bool = False) -> Episode:
    """Reset ``env`` with ``seed`` and step ``act`` until success (termination) or the step limit."""
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    seen: list[dict[str, np.ndarray]] = []
    actions: list[np.ndarray] = []
    ret, success, done, steps = 0.0, False, False, 0
    while not done:
        # What the env executes: experts (e.g. MetaWorld's) may ask for more than the bounds.
        action = np.clip(np.asarray(act(obs), dtype=np.float32), low, high)
        if record:
            seen.append(obs)
            actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        ret += float(reward)
        success = success or bool(info.get("success", False))
        done = terminated or truncated
    episode = Episode(seed, success, steps, ret, 0.0)
    if record:
        episode.obs = {k: np.stack([o[k] for o in seen]) for k in seen[0]}
        episode.actions = np.stack(actions)
    episode.wall_s = time.perf_counter() - start
    return episode
