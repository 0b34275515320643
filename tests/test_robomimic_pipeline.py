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


def robomimic_bc_rnn_checkpoint(hdf5, keys, out_dir):
    """A BC-RNN ``.pth`` written by robomimic 0.3.0's own ``train.py`` at tiny size (1 epoch)."""
    from difftori.eval.suites.robomimic_compat import run_script
    from robomimic.config import config_factory

    rc = config_factory("bc")
    with rc.values_unlocked():
        rc.experiment.name = "tiny"
        rc.experiment.validate = False
        rc.experiment.rollout.enabled = False
        rc.experiment.logging.log_tb = False
        rc.experiment.logging.terminal_output_to_txt = False
        rc.experiment.save.enabled = True
        rc.experiment.save.every_n_epochs = 1
        rc.experiment.epoch_every_n_steps = 3
        rc.train.data = str(hdf5)
        rc.train.output_dir = str(out_dir)
        rc.train.num_epochs = 1
        rc.train.batch_size = 4
        rc.train.seq_length = 5
        rc.train.cuda = False
        rc.train.hdf5_cache_mode = "low_dim"
        rc.algo.actor_layer_dims = []
        rc.algo.rnn.enabled = True
        rc.algo.rnn.horizon = 5
        rc.algo.rnn.hidden_dim = 16
        rc.observation.modalities.obs.low_dim = list(keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = out_dir / "bc_rnn.json"
    cfg.write_text(rc.dump())
    run_script("robomimic.scripts.train", ["--config", str(cfg)])
    (pth,) = out_dir.glob("tiny/*/models/model_epoch_1.pth")
    return pth


def test_a_bc_rnn_from_robomimics_train_script_is_imported_refined_and_evaluated(generated, tmp_path):
    """`train-base --checkpoint X.pth` turns robomimic's checkpoint into one of ours whose actions
    are robomimic's own rollout policy's, step by step; it is refined and evaluated like a trained one."""
    import torch
    from difftori.base_policies import load_policy
    from robomimic.utils.file_utils import policy_from_checkpoint

    keys = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
    pth = robomimic_bc_rnn_checkpoint(hdf5_path(generated.path), keys, tmp_path / "rm")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS | {"train_refiner": PARAMS["train_base"]}))
    common = ["--task", "lift", "--policy", "bc_rnn", "--params", str(params), "--demos", str(generated.path)]
    model = tmp_path / "m"
    assert main(["train-base", *common, "--checkpoint", str(pth), "--out", str(model)]) == 0
    ours = load_policy(model)
    assert ours.weights == "raw" and ours.obs_keys == tuple(keys) and ours.info["imported_from"] == str(pth)
    theirs, _ = policy_from_checkpoint(ckpt_path=str(pth))
    theirs.start_episode()
    ours.reset()
    ep = generated.episode(0)
    for t in range(7):  # across robomimic's state reset at step 5
        obs = {k: ep[k][t] for k in keys}
        want = theirs(ob=obs)
        got = ours.predict_action_chunk({k: torch.from_numpy(v)[None, None] for k, v in obs.items()})
        np.testing.assert_allclose(got[0, 0].numpy(), want, atol=1e-5)

    inits, refiner = tmp_path / "inits.zarr", tmp_path / "r"
    assert main(["init-actions", *common, "--model", str(model), "--out", str(inits)]) == 0
    args = ["--inits", str(inits), "--out", str(refiner), "--no-progress"]
    assert main(["train-refiner", *common, "--refiner", "residual", *args]) == 0
    out = tmp_path / "r.json"
    ev = ["--model", str(model), "--refiner-model", str(refiner), "--out", str(out), "--no-progress"]
    assert main(["evaluate", *common, "--refiner", "residual", *ev]) == 0
    result = EvalResult.read(out)
    assert result.method == "Residual + BC-RNN" and result.config["envs_per_worker"] == 1
    assert [(e.status, e.steps) for e in result.episodes] == [("ok", 10)] * 2
    assert all(e.action_shift_mean is not None for e in result.episodes)
