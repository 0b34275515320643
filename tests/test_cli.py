"""The ``difftori`` command line: help at every level, clear errors and non-zero exits."""

import subprocess
import sys

import pytest
from difftori.pipeline.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "difftori.pipeline.cli", *args], capture_output=True, text=True
    )


def test_help_at_every_level():
    top = run_cli("--help")
    assert top.returncode == 0 and "demos" in top.stdout
    demos = run_cli("demos", "--help")
    assert demos.returncode == 0
    for flag in ("--task", "--params", "--episodes", "--seed", "--out", "--obs", "--zarr-format"):
        assert flag in demos.stdout


def test_unknown_task_exits_nonzero_and_lists_tasks(tmp_path):
    out = tmp_path / "x.zarr"
    r = run_cli(
        "demos", "--suite", "metaworld", "--task", "shelf-plaice", "--episodes", "1", "--out", str(out)
    )
    assert r.returncode == 1
    assert "unknown metaworld task 'shelf-plaice'" in r.stderr and "shelf-place" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "shelf-place", "--episodes", "0"], "episodes must be >= 1"),
        (
            ["--task", "shelf-place", "--max-attempts", "3", "--episodes", "5"],
            "max_attempts (3) < episodes (5)",
        ),
        (
            ["--suite", "robosuit", "--task", "lift"],
            "unknown suite 'robosuit'; registered suites: maniskill, metaworld",
        ),
        (["--task", "reach", "--obs", "n_pionts=64"], "unknown keys ['n_pionts'] for MetaWorldObsConfig"),
        (["--task", "reach", "--obs", "n_points"], "--obs 'n_points': expected KEY=VALUE"),
    ],
)
def test_bad_values_exit_1(tmp_path, caplog, args, message):
    assert main(["demos", "--suite", "metaworld", *args, "--out", str(tmp_path / "x.zarr")]) == 1
    assert message in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2(tmp_path):
    for args in (
        ["demos", "--out", str(tmp_path / "x.zarr")],
        ["demos", "--task", "x", "--episodes", "two"],
        ["nope"],
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2


def test_existing_output_is_not_replaced(tmp_path, caplog):
    out = tmp_path / "x.zarr"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert (
        main(["demos", "--suite", "metaworld", "--task", "reach", "--episodes", "1", "--out", str(out)]) == 1
    )
    assert "already exists" in caplog.text and (out / "keep").read_text() == "mine"


def test_packages_live_under_the_difftori_namespace(tmp_path):
    """Installed as difftori.<folder>; nothing under bare names (checked outside the repo root)."""
    code = (
        "import importlib.util as u;"
        "print([u.find_spec(f'difftori.{n}') is not None for n in "
        "('pipeline', 'datasets', 'base_policies', 'refiners', 'eval')],"
        "[u.find_spec(n) is not None for n in ('base_policies', 'refiners', 'pipeline')])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout.strip() == "[True, True, True, True, True] [False, False, False]", r.stderr


def test_demos_without_a_suite_name_the_choices(tmp_path, caplog):
    assert main(["demos", "--task", "reach", "--out", str(tmp_path / "x.zarr")]) == 1
    assert "no suite: give --suite or `suite:`; suites: maniskill, metaworld, robomimic" in caplog.text
    assert list(tmp_path.iterdir()) == []
