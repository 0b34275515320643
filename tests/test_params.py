"""The shipped params files are valid: every section builds its typed config, every task exists."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from difftori.base_policies import POLICIES
from difftori.base_policies.configs import config_from_dict
from difftori.eval.evaluate import EvalConfig
from difftori.eval.suites import get_suite
from difftori.pipeline.params import refiner_config
from difftori.pipeline.training import TrainConfig
from difftori.refiners import REFINERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml", "params-robomimic.yaml"])
def test_params_file_is_valid(name):
    p = yaml.safe_load((ROOT / name).read_text())
    suite = get_suite(p["suite"])
    assert set(p["tasks"]) <= set(suite.tasks())
    config_from_dict(suite.obs_config, p["demos"]["obs"])
    assert p["seeds"] and all(isinstance(s, int) for s in p["seeds"])
    config_from_dict(TrainConfig, p["train_base"])
    config_from_dict(TrainConfig, p["train_refiner"])
    config_from_dict(EvalConfig, p["evaluate"])
    for policy in p["base_policies"]:
        cls = POLICIES.get_class(policy)
        config_from_dict(cls.config_cls, p["policies"].get(policy) or {})
    for refiner in [*p["refiners"], *p["refiner_configs"]]:
        cfg = refiner_config(p, refiner)
        cls = REFINERS.get_class(cfg.pop("type"))
        config_from_dict(cls.config_cls, cfg)


def _flat(config: object, prefix: str = "") -> dict[str, object]:
    """A config dataclass as ``{dotted.field: value}``."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out |= _flat(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml"])
def test_variants_change_only_what_they_name(name):
    """Every named variant's resolved config equals its type's, except the fields it names."""
    p = yaml.safe_load((ROOT / name).read_text())
    variants = {k: v for k, v in p["refiner_configs"].items() if "type" in v}
    assert variants
    for variant, own in variants.items():
        kind = own["type"]
        cls = REFINERS.get_class(kind).config_cls
        base = _flat(config_from_dict(cls, _no_type(p, kind)))
        resolved = _flat(config_from_dict(cls, _no_type(p, variant)))
        named = set(_flat_keys({k: v for k, v in own.items() if k != "type"}))
        changed = {k for k in resolved if resolved[k] != base[k]}
        assert changed <= named, (variant, changed, named)


def _no_type(p: dict, name: str) -> dict:
    cfg = refiner_config(p, name)
    cfg.pop("type")
    return cfg


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def test_paper_params_match_the_paper():
    p = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    assert len(p["tasks"]) == 22 and len(set(p["tasks"])) == 22  # Table 1
    assert p["evaluate"]["episodes"] == 50 and len(p["seeds"]) == 3
    assert "ibc_alone" in p["refiners"]  # IBC alone as a configured variant


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml"])
def test_every_refiner_and_variant_has_its_own_table_label(name):
    """Result rows are keyed by method label: two configured refiners must never share one."""
    from difftori.base_policies.base import ShapeMeta

    p = yaml.safe_load((ROOT / name).read_text())
    shape = ShapeMeta(obs={"state": {"shape": [3], "kind": "lowdim"}}, action_dim=4)
    labels = {}
    for refiner in dict.fromkeys([*p["refiners"], *p["refiner_configs"]]):
        cfg = _no_type(p, refiner) | {"encoder": {"lowdim_hidden": [8]}}
        kind = refiner_config(p, refiner)["type"]
        labels[refiner] = REFINERS.make(kind, cfg, shape).method_label("DP3")
    assert len(set(labels.values())) == len(labels), labels
