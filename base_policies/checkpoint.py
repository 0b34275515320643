"""The checkpoint format shared by base policies and refiners: a directory of

* ``config.json``        {"format_version", "kind", "name", "config", "shape_meta", "info"}
* ``model.safetensors``  the trained weights (normaliser statistics included)
* ``ema.safetensors``    the EMA weights, when training kept an EMA

No pickles: :func:`read_checkpoint` rebuilds nothing itself; the registry builds the module from
``config.json`` and loads the tensors. Writes are atomic (temporary directory, then rename).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = {"raw": "model.safetensors", "ema": "ema.safetensors"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt or does not fit the module; names dir and file."""


@dataclass
class Checkpoint:
    """The parsed ``config.json`` of a checkpoint directory."""

    kind: str  # "base_policy" or "refiner"
    name: str  # registry name, e.g. "dp3"
    config: dict[str, Any]
    shape_meta: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # task, training summary, ...
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "name": self.name,
            "config": self.config,
            "shape_meta": self.shape_meta,
            "info": self.info,
        }


def write_checkpoint(
    path: str | os.PathLike[str], ckpt: Checkpoint, weights: dict[str, dict[str, torch.Tensor]]
) -> Path:
    """Write ``config.json`` and one safetensors file per entry of ``weights`` ("raw", "ema")."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(json.dumps(ckpt.to_dict(), indent=2, sort_keys=True))
    for which, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS[which])
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_checkpoint(path: str | os.PathLike[str], kind: str) -> Checkpoint:
    """Parse and check ``config.json``; raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a difftori checkpoint directory)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({e})") from None
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: format_version {d.get('format_version')!r}, this difftori reads {FORMAT_VERSION}"
        )
    if d.get("kind") != kind:
        raise CheckpointError(f"{cfg_file}: kind is {d.get('kind')!r}, expected {kind!r}")
    missing = {"name", "config", "shape_meta"} - set(d)
    if missing:
        raise CheckpointError(f"{cfg_file}: missing fields {sorted(missing)}")
    return Checkpoint(**d)


def read_weights(path: str | os.PathLike[str], which: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """Load ``which`` weights ("ema" falls back to "raw" when no EMA was kept); returns (state, which)."""
    path = Path(path)
    if which == "ema" and not (path / WEIGHTS["ema"]).exists():
        which = "raw"
    f = path / WEIGHTS[which]
    if not f.is_file():
        raise CheckpointError(f"{f}: missing weights file")
    try:
        return load_file(f), which
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict`` whose mismatches name the checkpoint file and the offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        raise CheckpointError(
            f"{source}: weights do not fit the module built from config.json "
            f"(missing {missing[:5]}, unexpected {extra[:5]}, shape mismatches {shapes[:5]})"
        )
    module.load_state_dict(state)
