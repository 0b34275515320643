"""The checkpoint format shared by base policies and refiners: a directory of

* ``config.json``        {"format_version", "kind", "name", "config", "shape_meta", "info", "files"}
* ``model.safetensors``  the trained weights (normaliser statistics included)
* ``ema.safetensors``    the EMA weights, when training kept an EMA

No pickles: :func:`read_checkpoint` rebuilds nothing itself; the registry builds the module from
``config.json`` and loads the tensors. Writes are atomic (temporary directory, then rename) and
hold the directory's writer lock (``<dir>.lock``). ``files`` (format 2) records the sha256 of every
weights file; loading verifies all of them, so a truncated, altered or deleted file is an error
naming it. Format-1 checkpoints (no hashes) still load, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from difftori.datasets.safeio import OutputLock, file_sha256, naming_path
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no weights hashes
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
    files: dict[str, str] = field(default_factory=dict)  # weights file -> sha256 (format 2)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "name": self.name,
            "config": self.config,
            "shape_meta": self.shape_meta,
            "info": self.info,
            "files": self.files,
        }


def write_checkpoint(
    path: str | os.PathLike[str], ckpt: Checkpoint, weights: dict[str, dict[str, torch.Tensor]]
) -> Path:
    """Write one safetensors file per entry of ``weights`` ("raw", "ema"), then ``config.json``
    with their hashes, into a temporary directory renamed to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with OutputLock(path), naming_path(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for which, state in weights.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS[which])
        files = {WEIGHTS[w]: file_sha256(tmp / WEIGHTS[w]) for w in weights}
        ckpt = replace(ckpt, files=files, format_version=FORMAT_VERSION)
        (tmp / CONFIG).write_text(json.dumps(ckpt.to_dict(), indent=2, sort_keys=True))
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_checkpoint(path: str | os.PathLike[str], kind: str | None = None) -> Checkpoint:
    """Parse and check ``config.json``; raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a difftori checkpoint directory)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({e})") from None
    if d.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{cfg_file}: format_version {d.get('format_version')!r}, this difftori reads {READABLE_VERSIONS}"
        )
    if kind is not None and d.get("kind") != kind:
        raise CheckpointError(f"{cfg_file}: kind is {d.get('kind')!r}, expected {kind!r}")
    missing = {"name", "config", "shape_meta"} - set(d)
    if missing:
        raise CheckpointError(f"{cfg_file}: missing fields {sorted(missing)}")
    return Checkpoint(**d)


def verify_files(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Check every weights file ``config.json`` records: present, with its recorded sha256."""
    path = Path(path)
    if ckpt.format_version < 2:
        log.warning("%s: format-1 checkpoint: no weights hashes recorded, files not verified", path / CONFIG)
        return
    for name, digest in sorted(ckpt.files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(
                f"{f}: missing, though {CONFIG} records it; re-train or re-import the checkpoint"
            )
        got = file_sha256(f)
        if got != digest:
            raise CheckpointError(
                f"{f}: sha256 {got[7:19]}... differs from {digest[7:19]}... recorded in {CONFIG} "
                "(truncated or modified); re-train or re-import the checkpoint"
            )


def read_weights(
    path: str | os.PathLike[str], which: str = "ema", ckpt: Checkpoint | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Load ``which`` weights ("ema" or "raw") after :func:`verify_files`; returns (state, which).

    "ema" loads the raw weights only when ``config.json`` records that no EMA was kept; a missing
    EMA file that it does not account for is an error (no silent fallback).
    """
    path = Path(path)
    ckpt = ckpt or read_checkpoint(path)
    verify_files(path, ckpt)
    if which == "ema" and ckpt.format_version >= 2 and WEIGHTS["ema"] not in ckpt.files:
        log.info("%s: saved without EMA weights (ema: false); loading %s", path, WEIGHTS["raw"])
        which = "raw"
    elif which == "ema" and not (path / WEIGHTS["ema"]).is_file():
        raise CheckpointError(
            f"{path / WEIGHTS['ema']}: missing; this format-1 checkpoint does not record whether EMA "
            "weights were kept: ask for weights: raw to load model.safetensors"
        )
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
