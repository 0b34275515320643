"""Typed dataclass configs built from plain dicts (params.yaml, config.json), validated on load."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML/JSON) fits the type hint; ints are floats, bools are not ints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if origin in (tuple, list) or hint in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # other hints are not checked here


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "")


def config_from_dict(cls: type[T], d: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``d``: unknown keys and values of the wrong type are errors,
    nested dataclasses and tuples are rebuilt from dicts and lists. ``where`` names the source in
    error messages."""
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
        if not _type_ok(value, hint):
            got = f"{type(d[name]).__name__} {d[name]!r}"
            raise ValueError(f"{where}: {name}: expected {_type_name(hint)}, got {got}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a dataclass config (tuples become lists)."""
    return dataclasses.asdict(config)
