"""The whole pipeline through real ``dvc repro`` on tiny params files, in a temporary copy of the
repository: MetaWorld demos -> DP3 -> init actions -> refiners -> rollouts -> success tables; and
robomimic demos (robosuite's recorder, robomimic's scripts) -> Diffusion Policy -> refiners ->
rollouts in the env rebuilt from env_args -> failure tables; ManiSkill demos (its motion planner and
replay_trajectory) -> PointNet-BC -> refiners -> rollouts in the env rebuilt from env_info."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = {"down_dims": [16, 32], "num_inference_steps": 2, "num_train_timesteps": 10}
TINY_ENCODER = {"point_hidden": [16, 32], "point_out": 16, "lowdim_hidden": [16, 16]}
TINY = {
    "suite": "metaworld",
    "tasks": ["sweep-into"],
    "seeds": [0],
    "demos": {"episodes": 2, "seed": 0, "max_episode_steps": 200, "obs": {"n_points": 64}, "zarr_format": 2},
    "base_policies": ["dp3"],
    "policies": {
        "dp3": TINY_NET | {"encoder": TINY_ENCODER},
        "diffusion": TINY_NET | {"encoder": TINY_ENCODER},
    },
    "base_checkpoints": {},
    "train_base": {
        "max_steps": 4,
        "batch_size": 8,
        "val_episodes": 1,
        "val_every_steps": 2,
        "num_threads": 1,
    },
    "init_actions": {"samples": 2, "seed": 0, "batch_size": 64},
    "refiners": ["residual", "ibc", "difftori"],
    "refiner_configs": {
        "residual": {"hidden": [16], "encoder": TINY_ENCODER},
        "ibc": {"hidden": [16], "dfo_samples": 16, "encoder": TINY_ENCODER},
        "difftori": {
            "hidden": [16],
            "latent_dim": 4,
            "state_dim": 8,
            "encoder": TINY_ENCODER,
            "trajopt": {"max_iterations": 2},
        },
    },
    "train_refiner": {"max_steps": 3, "batch_size": 8, "val_every_steps": 3, "num_threads": 1},
    "evaluate": {"episodes": 2, "seed": 100, "max_episode_steps": 12, "workers": 2, "videos": 1},
}


def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _repo(tmp_path: Path, params: dict) -> Path:
    """A git copy of the repository's tracked files (no dvc.lock) with ``params`` as params.yaml."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    repo = tmp_path / "repo"
    for name in files.stdout.split():
        if name == "dvc.lock" or not (ROOT / name).exists():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny"], repo)
    return repo


def test_dvc_repro_end_to_end(tmp_path):
    repo = _repo(tmp_path, TINY)
    _run(["dvc", "repro"], repo)

    t, b = "sweep-into", "dp3"
    assert (repo / f"data/demos/{t}.zarr").is_dir()
    assert json.loads((repo / f"models/{t}/{b}/seed0/config.json").read_text())["name"] == b
    assert (repo / f"logs/{t}/{b}/seed0/val/action_mse.tsv").read_text().startswith("step\taction_mse")
    assert (repo / f"data/inits/{t}/{b}/seed0.zarr").is_dir()
    for refiner in ("residual", "ibc", "difftori"):
        assert (repo / f"models/{t}/{b}-{refiner}/seed0/model.safetensors").is_file()
    methods = {}
    for refiner in ("none", "residual", "ibc", "difftori"):
        result = json.loads((repo / f"results/evals/{t}/{b}/{refiner}/seed0.json").read_text())
        assert [e["status"] for e in result["episodes"]] == ["ok", "ok"]
        assert all(1 <= e["steps"] <= 12 for e in result["episodes"])
        methods[refiner] = result["method"]
        videos = list((repo / f"results/videos/{t}/{b}/{refiner}/seed0").glob("*.mp4"))
        assert len(videos) == 1 and videos[0].stat().st_size > 0
    assert methods == {
        "none": "DP3",
        "residual": "Residual + DP3",
        "ibc": "IBC + DP3",
        "difftori": "DiffTORI (anchor 0.1) + DP3",  # the anchor is named: not the paper's objective
    }
    # the same evaluation episodes for every method
    seeds = {
        r: [
            e["env_seed"]
            for e in json.loads((repo / f"results/evals/{t}/{b}/{r}/seed0.json").read_text())["episodes"]
        ]
        for r in methods
    }
    assert len({tuple(s) for s in seeds.values()}) == 1

    md = (repo / "results/tables/success.md").read_text().splitlines()
    first = md.index(next(line for line in md if line.startswith("| Method")))
    table = md[first : md.index("", first)]  # the success table (the paired-difference table follows)
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| Method")]
    assert [r.split("|")[1].strip() for r in rows] == list(methods.values())
    assert (
        md[[i for i, line in enumerate(md) if line.startswith("| Method")][0]]
        == f"| Method | {t} | Average |"
    )
    table = list(csv.DictReader((repo / "results/tables/success.csv").open()))
    assert {r["method"] for r in table} == set(methods.values())
    assert all(0 <= float(r["mean"]) <= 100 for r in table)
    assert "\\begin{tabular}" in (repo / "results/tables/success.tex").read_text()
    metrics = json.loads((repo / "results/metrics.json").read_text())
    assert set(metrics["metaworld"][t]) == set(methods.values())
    assert (repo / "results/plots/rates.png").is_file()

    status = _run(["dvc", "status"], repo)
    assert "up to date" in status, status
    # changing one refiner's params reruns only that refiner's chain (and the report): check-params
    # revalidates any params change and rewrites the resolved configs, of which only one changed
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["refiner_configs"]["residual"]["hidden"] = [8]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run(["dvc", "repro"], repo)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == [
        "check-params",
        f"evaluate@{t}-{b}-residual-0",
        "report",
        f"train-refiner@{t}-{b}-residual-0",
    ], out

    # a sweep on DVC's queue: swapping the base policy, and two training seeds, are params
    # overrides run as two experiments in parallel; dvc exp show lists them, and one report merges them
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))
    _run(["dvc", "exp", "run", "--queue", "-n", "swap", "-S", "base_policies=[diffusion]"], repo)
    _run(["dvc", "exp", "run", "--queue", "-n", "seeds", "-S", "seeds=[0,1]"], repo)
    _run(["dvc", "queue", "start", "-j", "2"], repo)
    _wait_for_queue(repo)
    assert {"swap", "seeds"} <= set(_run(["dvc", "exp", "list", "--name-only"], repo).split())
    rows = list(csv.reader(_run(["dvc", "exp", "show", "--csv"], repo).splitlines()))
    swap = dict(zip(rows[0], next(row for row in rows if row and row[0] == "swap"), strict=True))
    assert swap["metaworld.average.Diffusion Policy"] != "", swap  # the experiment's metrics
    assert "['diffusion']" in _run(["dvc", "params", "diff", "swap", "HEAD"], repo)
    _run(["difftori", "report", "--from-experiments"], repo)
    merged = list(csv.DictReader((repo / "results/experiments/tables/success.csv").open()))
    by_method = {r["method"]: r for r in merged if r["task"] == t}
    assert set(by_method) == {
        *methods.values(),
        "Diffusion Policy",
        *(f"{m} + Diffusion Policy" for m in ("Residual", "IBC", "DiffTORI (anchor 0.1)")),
    }, by_method
    # DP3 from the 'seeds' experiment (seeds 0 and 1), Diffusion Policy from 'swap' (seed 0)
    assert by_method["DP3"]["seeds"] == "2" and by_method["Diffusion Policy"]["seeds"] == "1"


def _wait_for_queue(repo: Path, timeout: float = 1200) -> None:
    """Until DVC's queue has no queued or running experiment; a failed one fails with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _run(["dvc", "queue", "status"], repo)
        failed = [line.split()[1] for line in status.splitlines() if "Failed" in line]
        assert not failed, _run(["dvc", "queue", "logs", failed[0]], repo)
        if not any(w in status for w in ("Queued", "Running")):
            return
        time.sleep(5)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


LOWDIM = ["object", "robot0_eef_pos", "robot0_gripper_qpos"]
TINY_ROBOMIMIC = TINY | {
    "suite": "robomimic",
    "tasks": ["lift"],
    "demos": {"episodes": 2, "seed": 0, "obs": {"images": False}, "zarr_format": 2},
    "base_policies": ["diffusion"],
    "policies": {"diffusion": TINY_NET | {"obs_keys": LOWDIM, "encoder": {"lowdim_hidden": [16, 16]}}},
    "train_base": TINY["train_base"] | {"val_episodes": 0},
    "refiners": ["residual", "difftori"],
    "refiner_configs": {
        "residual": {"hidden": [16], "obs_keys": LOWDIM},
        "difftori": TINY["refiner_configs"]["difftori"] | {"obs_keys": LOWDIM},
    },
}


def test_dvc_repro_robomimic(tmp_path):
    """The same graph on the robomimic suite: a failure-rate table from the env rebuilt from the
    stored env_args; the robomimic hdf5 the store came from is kept beside it (untracked)."""
    repo = _repo(tmp_path, TINY_ROBOMIMIC)
    _run(["dvc", "repro"], repo)

    t, b = "lift", "diffusion"
    assert (repo / f"data/demos/{t}.hdf5").is_file() and (repo / f"data/demos/{t}.zarr").is_dir()
    methods = {}
    for refiner in ("none", "residual", "difftori"):
        result = json.loads((repo / f"results/evals/{t}/{b}/{refiner}/seed0.json").read_text())
        assert (result["suite"], result["metric"]) == ("robomimic", "failure")
        assert [(e["status"], e["success"], e["steps"]) for e in result["episodes"]] == [
            ("ok", False, 12)
        ] * 2
        assert result["config"]["envs_per_worker"] == 1
        methods[refiner] = result["method"]
    md = (repo / "results/tables/failure.md").read_text()
    for method in methods.values():  # an untrained policy fails every 12-step episode: 100
        assert f"| {method} | **100.0** | **100.0** |" in md, md  # all tied for best (lowest)
    assert "failure rate of the method minus that of its base (negative = better)" in md
    metrics = json.loads((repo / "results/metrics.json").read_text())
    assert set(metrics["robomimic"][t]) == set(methods.values())
    assert "up to date" in _run(["dvc", "status"], repo)
    assert "data/demos/lift.hdf5" not in _run(["git", "status", "--porcelain"], repo)


TINY_MANISKILL = TINY | {
    "suite": "maniskill",
    "tasks": ["pick-cube"],
    "demos": {"episodes": 2, "seed": 0, "obs": {"n_points": 64, "camera_size": 64}, "zarr_format": 2},
    "base_policies": ["pointnet_bc"],
    "policies": {"pointnet_bc": {"hidden": [16], "encoder": TINY_ENCODER}},
    "init_actions": {"samples": 1, "seed": 0, "batch_size": 64},
    "refiners": ["residual", "difftori"],
    # one worker: each ManiSkill worker imports the simulator and builds its env (~5-10 s)
    "evaluate": TINY["evaluate"] | {"workers": 1, "videos": 0},
}


def test_dvc_repro_maniskill(tmp_path):
    """The graph on the maniskill suite: demos planned and replayed by ManiSkill's own tools,
    PointNet-BC, a success-rate table from the env rebuilt from the stored env_info; the planner's
    trajectory is kept beside the store (untracked)."""
    repo = _repo(tmp_path, TINY_MANISKILL)
    _run(["dvc", "repro"], repo)

    t, b = "pick-cube", "pointnet_bc"
    assert (repo / f"data/demos/{t}.motionplanning.h5").is_file()
    methods = {}
    for refiner in ("none", "residual", "difftori"):
        result = json.loads((repo / f"results/evals/{t}/{b}/{refiner}/seed0.json").read_text())
        assert (result["suite"], result["metric"]) == ("maniskill", "success")
        assert [(e["status"], e["success"], e["steps"]) for e in result["episodes"]] == [
            ("ok", False, 12)
        ] * 2
        methods[refiner] = result["method"]
    md = (repo / "results/tables/success.md").read_text()
    for method in methods.values():  # an untrained policy picks no cube in 12 steps
        assert f"| {method} | **0.0** |" in md, md
    metrics = json.loads((repo / "results/metrics.json").read_text())
    assert set(metrics["maniskill"][t]) == set(methods.values())
    assert "up to date" in _run(["dvc", "status"], repo)
    assert "motionplanning" not in _run(["git", "status", "--porcelain"], repo)
