"""Training under Lightning DDP: 2 CPU processes (gloo) through the CLI, as Lightning launches them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from difftori.base_policies import load_policy
from safetensors.numpy import load_file
from store_helpers import TINY_CONFIGS, write_policy_store

DIFFTORI = str(Path(sys.executable).parent / "difftori")
TRAIN = {"max_steps": 12, "batch_size": 8, "val_every_steps": 6, "num_threads": 1}
DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    store = write_policy_store(root / "toy.zarr", episodes=4, length=16)
    params = root / "params.yaml"
    policies = {"pointnet_bc": TINY_CONFIGS["pointnet_bc"]}
    params.write_text(yaml.safe_dump({"train_base": TRAIN | DDP, "policies": policies}))
    return root, store.path, params


def _train(setup, out: Path) -> subprocess.Popen:
    _, demos, params = setup
    args = ["train-base", "--task", "toy", "--policy", "pointnet_bc", "--params", str(params)]
    args += ["--demos", str(demos), "--out", str(out), "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(  # its own session: an interruption kills both ranks
        [DIFFTORI, *args], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_ddp_trains_on_two_processes_saves_once_and_resumes_exactly(setup):
    root = setup[0]
    whole = root / "models" / "whole"
    log = _finish(_train(setup, whole))
    summary = json.loads((whole / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["resumed"]) == (12, 2, False)
    assert log.count("training pointnet_bc on toy") == 2  # both ranks ran the stage
    assert log.count(f"saved {whole}") == 1  # rank 0 alone writes the model
    assert load_policy(whole).info["train_config"]["devices"] == 2
    assert not whole.with_name("whole.work").exists()

    split = root / "models" / "split"
    proc = _train(setup, split)
    ckpt = split.with_name("split.work") / "ckpt" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks, after the first epoch's checkpoint
    proc.communicate()
    assert ckpt.exists() and not (split / "summary.json").exists()
    resumed = _finish(_train(setup, split))
    assert "resuming from" in resumed
    assert json.loads((split / "summary.json").read_text())["resumed"]
    a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # raw and EMA weights
