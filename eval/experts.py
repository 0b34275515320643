"""Scripted experts by suite name: ``expert(obs_dict) -> action`` for one env step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class MetaWorldExpert:
    """MetaWorld's own scripted policy for a task (``metaworld.policies``), acting on ``state``."""

    def __init__(self, task: str) -> None:
        from difftori.eval.envs.metaworld_env import resolve_task
        from metaworld.policies import ENV_POLICY_MAP

        self._policy = ENV_POLICY_MAP[resolve_task(task)]()

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self._policy.get_action(obs["state"].astype(np.float64)), dtype=np.float32)


EXPERTS: dict[str, Callable[[str], Callable[[dict[str, np.ndarray]], np.ndarray]]] = {
    "metaworld": MetaWorldExpert,
}


def make_expert(suite: str, task: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The scripted expert of ``suite`` for ``task``."""
    if suite not in EXPERTS:
        raise ValueError(f"no scripted expert for suite {suite!r}; suites with one: {sorted(EXPERTS)}")
    return EXPERTS[suite](task)
