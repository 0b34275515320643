"""Both shipped params files are valid: every section builds its typed config, every task exists."""

from pathlib import Path

import pytest
import yaml
from difftori.base_policies import POLICIES
from difftori.base_policies.configs import config_from_dict
from difftori.eval.envs.metaworld_env import resolve_task
from difftori.eval.evaluate import EvalConfig
from difftori.pipeline.training import TrainConfig
from difftori.refiners import REFINERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml"])
def test_params_file_is_valid(name):
    p = yaml.safe_load((ROOT / name).read_text())
    for task in p["tasks"]:
        resolve_task(task)
    assert p["seeds"] and all(isinstance(s, int) for s in p["seeds"])
    config_from_dict(TrainConfig, p["train_base"])
    config_from_dict(TrainConfig, p["train_refiner"])
    config_from_dict(EvalConfig, p["evaluate"])
    for policy in p["base_policies"]:
        cls = POLICIES.get_class(policy)
        config_from_dict(cls.config_cls, p["policies"].get(policy) or {})
    for refiner in p["refiners"]:
        cfg = dict(p["refiner_configs"].get(refiner) or {})
        cls = REFINERS.get_class(cfg.pop("type", refiner))
        config_from_dict(cls.config_cls, cfg)


def test_paper_params_match_the_paper():
    p = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    assert len(p["tasks"]) == 22 and len(set(p["tasks"])) == 22  # Table 1
    assert p["evaluate"]["episodes"] == 50 and len(p["seeds"]) == 3
    assert "ibc_alone" in p["refiners"]  # IBC alone as a configured variant
