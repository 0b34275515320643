"""Typed dataclass configs built from plain dicts (params.yaml, config.json), validated on load."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``d``: unknown keys are errors, nested dataclasses and tuples
    are rebuilt from dicts and lists. ``where`` names the source in error messages."""
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value, f"{where}.{name}")
        elif (origin is tuple or hint is tuple) and isinstance(value, list):
            value = tuple(value)
        elif origin in (types.UnionType, typing.Union) and isinstance(value, list):
            if any(typing.get_origin(a) is tuple for a in typing.get_args(hint)):
                value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a dataclass config (tuples become lists)."""
    return dataclasses.asdict(config)
