"""A robomimic file made by robomimic's own scripts goes through the command line: `difftori convert
robomimic` gives the store the suite wrote, a base policy trains on it, and `difftori evaluate`
rebuilds the env from the stored env_args and reports failures."""

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from difftori.datasets.episode_store import EpisodeStore  # noqa: E402
from difftori.eval.demos import DemoConfig, generate_demos  # noqa: E402
from difftori.eval.results import EvalResult  # noqa: E402
from difftori.eval.suites.robomimic import hdf5_path  # noqa: E402
from difftori.pipeline.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Mean of empty slice:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
TINY_NET = {"down_dims": [16, 32], "num_inference_steps": 2, "num_train_timesteps": 10}
PARAMS = {
    "policies": {"diffusion": TINY_NET | {"encoder": {"lowdim_hidden": [16, 16]}}},
    "train_base": {"max_steps": 4, "batch_size": 8, "val_every_steps": 2, "num_threads": 1},
    "evaluate": {"episodes": 2, "max_episode_steps": 10, "workers": 1, "seed": 100},
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two lift demos written by the suite (robosuite's recorder, robomimic's scripts, converter)."""
    cfg = DemoConfig(suite="robomimic", task="lift", episodes=2, seed=5)
    return generate_demos(cfg, tmp_path_factory.mktemp("gen") / "lift.zarr")


def test_convert_train_and_evaluate_through_the_cli(generated, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (videos) land here
    src = hdf5_path(generated.path)
    out = tmp_path / "lift.zarr"
    assert main(["convert", "robomimic", str(src), "--out", str(out)]) == 0
    store = EpisodeStore(out)
    assert store.keys == generated.keys and store.meta.task == "lift" and store.meta.suite == "robomimic"
    for key in store.keys:
        np.testing.assert_array_equal(store.array(key)[:], generated.array(key)[:])
    assert store.meta.params["env_args"] == generated.meta.params["env_args"]
    assert store.meta.params["env_args"]["env_name"] == "Lift"
    assert set(store.meta.splits) == {"train", "valid"}
    assert store.meta.episode_seeds == [1, 2]  # a user's file: the demo numbers stand in for seeds

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    common = ["--task", "lift", "--policy", "diffusion", "--params", str(params)]
    model = tmp_path / "m"
    assert main(["train-base", *common, "--demos", str(out), "--out", str(model), "--no-progress"]) == 0
    keys = json.loads((model / "config.json").read_text())["config"]["obs_keys"]
    assert keys == sorted(store.meta.obs_kinds)  # Diffusion Policy's default: every low-dim key
    result_path = tmp_path / "r.json"
    args = ["--demos", str(out), "--model", str(model), "--out", str(result_path), "--no-progress"]
    assert main(["evaluate", *common, "--refiner", "none", *args]) == 0
    result = EvalResult.read(result_path)
    assert (result.suite, result.metric, result.method) == ("robomimic", "failure", "Diffusion Policy")
    assert [(e.status, e.success, e.steps) for e in result.episodes] == [("ok", False, 10)] * 2
    assert result.config["max_episode_steps"] == 10 and result.config["envs_per_worker"] == 1  # capped


def test_a_broken_file_through_the_cli_names_it_and_leaves_nothing(tmp_path, caplog):
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    assert main(["convert", "robomimic", str(bad), "--out", str(tmp_path / "x.zarr")]) == 1
    assert f"{bad}: /: cannot open as hdf5" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.hdf5"]
