"""Registries by name: ``POLICIES.make("dp3", config, shape_meta)``, ``POLICIES.load(dir)``.

The same :class:`Registry` holds the refiners (:mod:`difftori.refiners`). Adding a policy or a
refiner is adding one module whose class is decorated with ``@REGISTRY.register``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from difftori.base_policies.base import ObsConditioned, ShapeMeta
from difftori.base_policies.checkpoint import (
    CheckpointError,
    load_state_strict,
    read_checkpoint,
    read_weights,
)
from difftori.base_policies.configs import config_from_dict


class Registry(dict[str, type[ObsConditioned]]):
    """Name -> class, with building from a config dict and loading from a checkpoint directory."""

    def __init__(self, kind: str, label: str) -> None:
        super().__init__()
        self.kind, self.label = kind, label

    def register(self, cls: type[ObsConditioned]) -> type[ObsConditioned]:
        """Class decorator: make ``cls`` available under ``cls.name``."""
        self[cls.name] = cls
        return cls

    def get_class(self, name: str) -> type[ObsConditioned]:
        if name not in self:
            raise ValueError(f"unknown {self.label} {name!r}; registered: {', '.join(sorted(self))}")
        return self[name]

    def make(self, name: str, config: dict[str, Any] | None, shape_meta: ShapeMeta) -> Any:
        """A new, untrained ``name`` with ``config`` (a dict, validated) for data of ``shape_meta``."""
        cls = self.get_class(name)
        return cls(config_from_dict(cls.config_cls, config, f"{name} config"), shape_meta)

    def load(self, path: str | os.PathLike[str], weights: str = "ema") -> Any:
        """Rebuild a saved module from its directory, without any training code, in eval mode.

        Every weights file is checked against the hashes in ``config.json`` first.
        ``weights="ema"`` loads the EMA weights; the raw ones only when ``config.json`` records
        that no EMA was kept (a missing EMA file is an error). ``module.weights`` says which.
        """
        path = Path(path)
        ckpt = read_checkpoint(path, kind=self.kind)
        try:
            cls = self.get_class(ckpt.name)
            config = config_from_dict(cls.config_cls, ckpt.config, f"{path / 'config.json'}: config")
            module = cls(config, ShapeMeta.from_dict(ckpt.shape_meta))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        state, which = read_weights(path, weights, ckpt)
        load_state_strict(module, state, path)
        module.weights = which
        module.info = ckpt.info
        return module.eval()


POLICIES = Registry("base_policy", "base policy")
register = POLICIES.register
make_policy = POLICIES.make
load_policy = POLICIES.load
