"""Reading params.yaml (the DVC params file) into typed configs, validated whole on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: Path | None, validate: bool = True) -> dict[str, Any]:
    """The params file as a dict, checked whole by :func:`validate_params` (``validate=False``
    skips that); ``None`` or a missing default ``params.yaml`` gives ``{}``."""
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
    if validate:
        validate_params(data, path)
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


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def refiner_config(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The config of refiner ``name`` with its ``type``: a registered refiner's own
    ``refiner_configs.<name>``, or a variant ``{type: <refiner>, ...}`` laid over its type's
    ``refiner_configs.<type>`` (nested keys merged), so a variant changes only what it names."""
    own = section(params, "refiner_configs", name)
    kind = own.pop("type", name)
    if kind == name:
        return own | {"type": kind}
    if "type" in section(params, "refiner_configs", kind):
        raise ValueError(f"params: refiner_configs.{name}: its type {kind!r} is itself a variant")
    return _merged(section(params, "refiner_configs", kind), own) | {"type": kind}


# The top-level sections of a params file (name -> what it holds); any other name is an error.
SECTIONS: dict[str, str] = {
    "suite": "simulator suite (str)",
    "tasks": "task names (list of str)",
    "seeds": "training seeds (list of int)",
    "demos": "demo generation settings",
    "base_policies": "registered base policy names (list of str)",
    "policies": "<policy>: its config",
    "base_checkpoints": "<task>: {<policy>: checkpoint dir}",
    "train_base": "TrainConfig",
    "init_actions": "InitActionsConfig",
    "refiners": "refiner names (list of str)",
    "refiner_configs": "<refiner>: its config, or a variant {type: <refiner>, ...}",
    "train_refiner": "TrainConfig",
    "evaluate": "EvalConfig",
}


def _check_list(params: dict[str, Any], key: str, item: type, where: str) -> list[Any]:
    value = params.get(key, [])
    if not isinstance(value, list) or not all(type(v) is item for v in value):
        raise ValueError(f"{where}: {key}: expected a list of {item.__name__}, got {value!r}")
    return value


def demo_config(params: dict[str, Any], task: str, where: str, **overrides: Any) -> Any:
    """The :class:`~difftori.eval.demos.DemoConfig` of ``task``: params ``suite`` and ``demos``
    (its ``obs`` validated against the suite's observation options), then ``overrides``."""
    from difftori.base_policies.configs import config_from_dict
    from difftori.eval.demos import DemoConfig
    from difftori.eval.suites import get_suite, suite_names

    d = {"suite": params.get("suite")} | section(params, "demos") | overrides | {"task": task}
    if not d["suite"]:
        raise ValueError(f"{where}: no suite: give --suite or `suite:`; suites: {', '.join(suite_names())}")
    try:
        suite = get_suite(d["suite"])
    except ValueError as e:
        raise ValueError(f"{where}: suite: {e}") from None
    cfg = config_from_dict(DemoConfig, d, f"{where}: demos")
    config_from_dict(suite.obs_config, cfg.obs, f"{where}: demos.obs ({cfg.suite})")
    return cfg


def _registered(name: str, names: Any, key: str, what: str, where: str, hint: str = "") -> None:
    if name not in names:
        raise ValueError(f"{where}: {key}: unknown {what} {name!r}; valid: {', '.join(sorted(names))}{hint}")


def _check_named_configs(params: dict[str, Any], where: str) -> set[str]:
    """Policy and refiner names (registered, or typed refiner variants) and their configs.
    Returns the refiner names that ``refiners`` may list."""
    from difftori.base_policies import POLICIES
    from difftori.base_policies.configs import config_from_dict
    from difftori.refiners import REFINERS

    for name in section(params, "policies"):
        _registered(name, POLICIES, f"policies.{name}", "base policy", where)
        cfg = section(params, "policies", name)
        config_from_dict(POLICIES[name].config_cls, cfg, f"{where}: policies.{name}")
    for name in _check_list(params, "base_policies", str, where):
        _registered(name, POLICIES, "base_policies", "base policy", where)
    for task in section(params, "base_checkpoints"):
        for name in section(params, "base_checkpoints", task):
            _registered(name, POLICIES, f"base_checkpoints.{task}.{name}", "base policy", where)
    variants = set(REFINERS)
    for name in section(params, "refiner_configs"):
        kind = section(params, "refiner_configs", name).get("type", name)
        key = f"refiner_configs.{name}" + (".type" if kind != name else "")
        _registered(kind, REFINERS, key, "refiner", where, " (a variant names its type: {type: ibc, ...})")
        cfg = refiner_config(params, name)
        cfg.pop("type")
        config_from_dict(REFINERS[kind].config_cls, cfg, f"{where}: refiner_configs.{name}")
        variants.add(name)
    return variants


def validate_params(params: dict[str, Any], where: str | Path = "params") -> None:
    """Check a whole params file: unknown sections, unknown policy or refiner names and wrong types
    are errors naming the key and listing the valid ones (a typo is never silently ignored)."""
    from difftori.base_policies.configs import config_from_dict
    from difftori.eval.evaluate import EvalConfig
    from difftori.eval.suites import get_suite
    from difftori.pipeline.init_actions import InitActionsConfig
    from difftori.pipeline.training import TrainConfig

    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section {unknown[0]!r}; valid sections: {', '.join(SECTIONS)}")
    if not isinstance(params.get("suite", ""), str):
        raise ValueError(f"{where}: suite: expected str, got {params['suite']!r}")
    tasks = _check_list(params, "tasks", str, str(where))
    _check_list(params, "seeds", int, str(where))
    if "suite" in params or "demos" in params or tasks:
        suite = demo_config(params, "", str(where)).suite
        for task in tasks:
            _registered(task, get_suite(suite).tasks(), "tasks", f"{suite} task", str(where))
    configs = {"train_base": TrainConfig, "train_refiner": TrainConfig, "init_actions": InitActionsConfig}
    for key, cls in (configs | {"evaluate": EvalConfig}).items():
        config_from_dict(cls, section(params, key), f"{where}: {key}")
    refiners = _check_named_configs(params, str(where))
    for name in _check_list(params, "refiners", str, str(where)):
        if name not in refiners:
            raise ValueError(
                f"{where}: refiners: unknown refiner {name!r}; registered or configured in "
                f"refiner_configs: {', '.join(sorted(refiners))}"
            )
