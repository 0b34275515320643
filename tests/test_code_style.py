"""The code base stays ruff clean (lint rules in pyproject.toml), its imports point downward only,
and each simulator is named only by its suite's module."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Higher layers may import lower ones, never the reverse (docs/architecture.md, "Layout").
LAYERS = ["datasets", "base_policies", "refiners", "eval", "pipeline"]


def test_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_layers(path: Path) -> set[str]:
    """The difftori subpackages a module imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n.split(".")[1] for n in names if n.startswith("difftori.") and n.count(".") >= 1}


def test_imports_point_downward_only():
    upward = []
    for rank, package in enumerate(LAYERS):
        for path in package_files(package):
            for layer in imported_layers(path) & set(LAYERS[rank + 1 :]):
                upward.append(f"{path.relative_to(ROOT)} imports difftori.{layer}")
    assert upward == []


def test_a_simulator_is_named_only_by_its_suite_module():
    """`grep -ril metaworld` over the package folders finds only the MetaWorld suite's module; only
    the maniskill suite's module imports ManiSkill or names sapien (its converter does neither)."""
    suites = {
        "metaworld": {"eval/suites/metaworld.py"},
        "sapien|import mani_skill": {"eval/suites/maniskill.py"},
    }
    for name, allowed in suites.items():
        naming = {
            str(p.relative_to(ROOT))
            for package in LAYERS
            for p in package_files(package)
            if re.search(name, p.read_text(), re.IGNORECASE)
        }
        assert naming == allowed, name
