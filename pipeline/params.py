"""Reading params.yaml (the DVC params file) into typed configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: Path | None) -> dict[str, Any]:
    """The params file as a dict; ``None`` or a missing default ``params.yaml`` gives ``{}``."""
    if path is None:
        return {}
    if not path.exists():
        if path.name == "params.yaml" and path.parent == Path("."):
            return {}
        raise FileNotFoundError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def section(params: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``params[k1][k2]...`` or ``{}`` when absent; a non-mapping value is an error naming the path."""
    node: Any = params
    for i, key in enumerate(keys):
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return {}
        if not isinstance(node, dict):
            raise ValueError(f"params: {'.'.join(keys[: i + 1])} must be a mapping, got {node!r}")
    return dict(node)
