"""Where each pipeline stage reads and writes (the CLI's defaults and dvc.yaml agree on these).

``seed`` is the training seed: base policy, init actions, refiner and evaluation of one seed form
one chain. Refiners live beside (not inside) their base's folder, because DVC outputs cannot nest.
"""

from __future__ import annotations

from pathlib import Path

NO_REFINER = "none"  # the base policy alone, in evaluation and tables


def demos(task: str) -> Path:
    return Path("data/demos") / f"{task}.zarr"


def base_model(task: str, policy: str, seed: int) -> Path:
    return Path("models") / task / policy / f"seed{seed}"


def train_logs(task: str, model: str, seed: int) -> Path:
    """Training curves (TSV) of ``model`` (``<policy>`` or ``<policy>-<refiner>``), for dvc plots."""
    return Path("logs") / task / model / f"seed{seed}"


def init_actions(task: str, policy: str, seed: int) -> Path:
    return Path("data/inits") / task / policy / f"seed{seed}.zarr"


def refiner_model(task: str, policy: str, refiner: str, seed: int) -> Path:
    return Path("models") / task / f"{policy}-{refiner}" / f"seed{seed}"


def eval_result(task: str, policy: str, refiner: str, seed: int) -> Path:
    return Path("results/evals") / task / policy / refiner / f"seed{seed}.json"


def eval_videos(task: str, policy: str, refiner: str, seed: int) -> Path:
    return Path("results/videos") / task / policy / refiner / f"seed{seed}"
