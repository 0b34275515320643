"""``dvc plots show`` loads every training curve under ``logs/`` and the report's plots, with no
error: a throwaway git + DVC repository with the project's dvc.yaml, params.yaml and .dvcignore,
and fabricated dvclive TSVs in the ``logs/<task>/<model>/seed<k>/`` layout beside the
``.gitignore`` files ``dvc repro`` writes there (no training)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CURVES = ("train/loss", "val/loss", "val/action_mse", "rollout/success_rate", "rollout/fit_time_s")


def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _fake_logs(repo: Path, params: dict) -> list[str]:
    """Curves for every (task, model, seed) of ``params``, and DVC's .gitignore per model folder."""
    files = []
    models = [p for b in params["base_policies"] for p in (b, *(f"{b}-{r}" for r in params["refiners"]))]
    for task in params["tasks"]:
        for model in models:
            folder = repo / "logs" / task / model
            for seed in params["seeds"]:
                for curve in CURVES:
                    path = folder / f"seed{seed}" / f"{curve}.tsv"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"step\t{curve.split('/')[1]}\n0\t1.0\n10\t0.5\n")
                    files.append(path.relative_to(repo).as_posix())
            (folder / ".gitignore").write_text("".join(f"/seed{s}\n" for s in params["seeds"]))
    return files


def _png() -> bytes:
    """A 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0\x80"))
        + chunk(b"IEND", b"")
    )


def test_dvc_plots_show_loads_every_curve(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params |= {"tasks": params["tasks"][:2], "seeds": [0, 1]}  # two of each, whatever the defaults
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    curves = _fake_logs(repo, params)
    (repo / "results/plots").mkdir(parents=True)
    (repo / "results/plots/rates.csv").write_text("run,rate\nsuccess | sweep | DP3,70.00\n")
    (repo / "results/plots/rates.png").write_bytes(_png())
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "fake logs"], repo)

    shown = json.loads(_run(["dvc", "plots", "show", "--json"], repo))
    assert not shown.get("errors"), shown.get("errors")
    loaded = {name for name, plots in shown["data"].items() if plots}
    assert set(curves) <= loaded, sorted(set(curves) - loaded)
    assert not any(name.endswith(".gitignore") for name in shown["data"])
    assert {"results/plots/rates.csv", "results/plots/rates.png"} <= loaded
    values = shown["data"][curves[0]][0]["content"]["data"]["values"]
    assert [(v["step"], v["loss"]) for v in values] == [("0", "1.0"), ("10", "0.5")]
