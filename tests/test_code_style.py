"""The code base stays ruff clean (lint rules in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
