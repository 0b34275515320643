"""Base policies by name: ``make_policy("dp3", config, shape_meta)`` and ``load_policy(dir)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from difftori.base_policies.base import BasePolicy, ShapeMeta
from difftori.base_policies.checkpoint import (
    CheckpointError,
    load_state_strict,
    read_checkpoint,
    read_weights,
)
from difftori.base_policies.configs import config_from_dict

POLICIES: dict[str, type[BasePolicy]] = {}


def register(cls: type[BasePolicy]) -> type[BasePolicy]:
    """Class decorator: make a policy available under ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[BasePolicy]:
    if name not in POLICIES:
        raise ValueError(f"unknown base policy {name!r}; registered: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def make_policy(name: str, config: dict[str, Any] | None, shape_meta: ShapeMeta) -> BasePolicy:
    """A new, untrained policy ``name`` with ``config`` (a dict, validated) for data of ``shape_meta``."""
    cls = policy_class(name)
    return cls(config_from_dict(cls.config_cls, config, f"{name} config"), shape_meta)


def load_policy(path: str | os.PathLike[str], weights: str = "ema") -> BasePolicy:
    """Rebuild a saved policy from its directory, without any training code.

    ``weights="ema"`` loads the EMA weights when the checkpoint has them (else the raw ones);
    the policy's ``weights`` attribute says which were loaded. The policy is in eval mode.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, kind="base_policy")
    try:
        cls = policy_class(ckpt.name)
        config = config_from_dict(cls.config_cls, ckpt.config, f"{path / 'config.json'}: config")
        policy = cls(config, ShapeMeta.from_dict(ckpt.shape_meta))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    state, which = read_weights(path, weights)
    load_state_strict(policy, state, path)
    policy.weights = which
    policy.info = ckpt.info
    return policy.eval()
