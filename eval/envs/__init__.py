"""Simulator envs by suite name. Each returns the observation keys its demo stores hold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym


def _metaworld(task: str, **kwargs: Any) -> gym.Env:
    from difftori.eval.envs.metaworld_env import MetaWorldEnv, MetaWorldObsConfig

    obs = kwargs.pop("obs", None)
    if isinstance(obs, dict):
        obs = MetaWorldObsConfig(**obs)
    return MetaWorldEnv(task, obs=obs, **kwargs)


# Suite name -> factory(task, **options). Imports are lazy: a suite's simulator loads only when used.
ENV_FACTORIES: dict[str, Callable[..., gym.Env]] = {"metaworld": _metaworld}


def make_env(suite: str, task: str, **kwargs: Any) -> gym.Env:
    """Build the env of ``suite`` for ``task``; unknown suites and tasks list the valid ones."""
    if suite not in ENV_FACTORIES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(sorted(ENV_FACTORIES))}")
    return ENV_FACTORIES[suite](task, **kwargs)
