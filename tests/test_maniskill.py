"""The maniskill suite on real ManiSkill 3.0.1 (CPU backend, lavapipe Vulkan): ManiSkill's own motion
planner plans a 2-demo PickCube trajectory and its own replay_trajectory turns it into state and
point-cloud files; the converter's shapes, counts and metadata; an open-loop replay of the stored
actions in the env rebuilt from the metadata, from the stored reset, succeeds and sees the stored
observations; bad files give errors naming the file, group and key, and leave nothing behind."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from difftori.datasets.episode_store import EpisodeStore, StoreError
from difftori.datasets.maniskill_h5 import (
    EnvFacts,
    ManiSkillFileError,
    ManiSkillObsConfig,
    convert_maniskill,
    to_pose_frame,
)
from difftori.eval.suites import get_suite, maniskill
from difftori.pipeline.cli import main

STATE_DIM = 42  # PickCube-v1's flat state: agent qpos, qvel + extra (tcp, goal, cube pose, ...)
AGENT_DIM = 29  # agent qpos 9, qvel 9 + extra goal_pos 3, is_grasped 1, tcp_pose 7


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    return maniskill.plan_demos("PickCube-v1", 2, 0, tmp_path_factory.mktemp("planned"))


def _replayed(planned: Path, folder: Path, obs: ManiSkillObsConfig) -> Path:
    for suffix in (".h5", ".json"):
        shutil.copy(planned.with_suffix(suffix), folder / f"trajectory{suffix}")
    return maniskill.replay_demos(folder / "trajectory.h5", obs)


@pytest.fixture(scope="module")
def state_file(planned, tmp_path_factory) -> Path:
    return _replayed(planned, tmp_path_factory.mktemp("state"), ManiSkillObsConfig(obs_mode="state"))


@pytest.fixture(scope="module")
def cloud_store(planned, tmp_path_factory) -> EpisodeStore:
    folder = tmp_path_factory.mktemp("cloud")
    src = _replayed(planned, folder, ManiSkillObsConfig(camera_size=64))
    obs = ManiSkillObsConfig(n_points=128, rgb=True)
    return maniskill.convert_trajectory(src, folder / "pick.zarr", obs=obs, progress=False)


def _episodes(src: Path) -> list[dict]:
    return json.loads(src.with_suffix(".json").read_text())["episodes"]


def test_convert_state_file_through_the_cli(state_file, tmp_path):
    out = tmp_path / "state.zarr"
    main(["convert", "maniskill", str(state_file), "--out", str(out)])
    store, episodes = EpisodeStore(out), _episodes(state_file)
    assert store.n_episodes == 2 and store.meta.task == "pick-cube" and store.meta.suite == "maniskill"
    assert store.meta.obs_kinds == {"state": "lowdim"} and store.meta.control_mode == "pd_ee_delta_pose"
    lengths = [e["elapsed_steps"] for e in episodes]
    assert store.episode_lengths.tolist() == lengths  # obs has one step more: dropped
    with h5py.File(state_file) as f:
        np.testing.assert_array_equal(store.episode(0)["state"], f["traj_0/obs"][:-1])
        np.testing.assert_array_equal(store.episode(1)["action"], f["traj_1/actions"][()])
    assert store.episode(0)["state"].shape == (lengths[0], STATE_DIM)
    assert store.meta.episode_seeds == [e["episode_seed"] for e in episodes]
    assert store.meta.params["reset_kwargs"] == [e["reset_kwargs"] for e in episodes]
    info = store.meta.params["env_info"]
    assert info["env_id"] == "PickCube-v1" and info["env_kwargs"]["obs_mode"] == "state"
    assert (store.meta.action_low, store.meta.action_high) == ([-1.0] * 7, [1.0] * 7)


def test_point_clouds_and_open_loop_replay_in_the_rebuilt_env(cloud_store):
    store, meta = cloud_store, cloud_store.meta
    assert meta.obs_kinds == {"point_cloud": "point_cloud", "agent_pos": "lowdim"}
    cloud = store.episode(0)["point_cloud"]
    assert cloud.shape[1:] == (128, 6) and store.episode(0)["agent_pos"].shape[1:] == (AGENT_DIM,)
    assert cloud[..., 2].min() > -0.5  # the ground (z = -0.92) is gone; the table top (z = 0) stays
    assert 0 <= cloud[..., 3:].min() and cloud[..., 3:].max() <= 1  # rgb / 255
    assert meta.params["drop_ids"] == [17] and meta.params["obs"]["camera_size"] == 64
    env = get_suite("maniskill").env_for_store(meta, maniskill.max_episode_steps("pick-cube"), None)
    try:
        for i in range(store.n_episodes):
            obs, _ = env.reset(seed=meta.episode_seeds[i], options=meta.params["reset_kwargs"][i]["options"])
            np.testing.assert_array_equal(obs["point_cloud"], store.episode(i)["point_cloud"][0])
            np.testing.assert_array_equal(obs["agent_pos"], store.episode(i)["agent_pos"][0])
            actions = store.episode(i)["action"]
            for action in actions:
                obs, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    break
            assert info["success"] and terminated, (i, len(actions))
    finally:
        env.close()


def test_tcp_frame():
    pose = np.array([0.1, 0.2, 0.3, np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])  # 90 degrees about z
    points = np.array([[0.1, 0.2, 0.3], [0.1, 1.2, 0.3], [1.1, 0.2, 0.5]])
    np.testing.assert_allclose(to_pose_frame(points, pose), [[0, 0, 0], [1, 0, 0], [0, -1, 0.2]], atol=1e-12)


# -- bad files ------------------------------------------------------------------------------------
FACTS = EnvFacts([-1.0] * 7, [1.0] * 7, {"ground": [17]})


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def _json(change):
    def corrupt(src: Path) -> None:
        path = src.with_suffix(".json")
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return corrupt


def _h5(change):
    def corrupt(src: Path) -> None:
        with h5py.File(src, "r+") as f:
            change(f)

    return corrupt


def _short_obs(f):
    obs = f["traj_1/obs"][:-2]
    del f["traj_1/obs"]
    f["traj_1/obs"] = obs


def _nan_action(f):
    f["traj_0/actions"][3, 2] = np.nan


@pytest.mark.parametrize(
    "corrupt, where, message",
    [
        (lambda src: src.with_suffix(".json").unlink(), ".json", "missing: ManiSkill keeps env_info"),
        (lambda src: src.with_suffix(".json").write_text("{no"), ".json", "not valid json"),
        (_json(lambda d: d["env_info"].pop("env_id")), ".json", "env_info: expected an object with env_id"),
        (_json(lambda d: d["env_info"]["env_kwargs"].update(obs_mode="none")), ".json", "replay the file"),
        (_json(lambda d: d["episodes"][0].pop("reset_kwargs")), ".json", "episodes[0]: expected an object"),
        (_json(lambda d: d["episodes"][1].update(episode_id=7)), ".h5", "traj_7: missing: trajectory.state"),
        (_h5(lambda f: f.create_group("extra")), ".h5", "extra: unexpected entry"),
        (_h5(lambda f: f.__delitem__("traj_1/actions")), ".h5", "traj_1/actions: expected a (T, action dim)"),
        (_h5(lambda f: f.__delitem__("traj_0/truncated")), ".h5", "traj_0/truncated: expected ("),
        (_h5(_short_obs), ".h5", "traj_1/obs: "),
        (_h5(_nan_action), ".h5", "traj_0/actions: NaN or inf at step 3"),
    ],
)
def test_bad_file_is_named_and_leaves_nothing(state_file, tmp_path, corrupt, where, message):
    for suffix in (".h5", ".json"):
        shutil.copy(state_file.with_suffix(suffix), tmp_path / f"{state_file.stem}{suffix}")
    src, out = tmp_path / state_file.name, tmp_path / "out.zarr"
    corrupt(src)
    with pytest.raises(ManiSkillFileError) as e:
        convert_maniskill(src, out, lambda info: FACTS, task="pick-cube", progress=False)
    assert isinstance(e.value, StoreError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"{src.with_suffix(where)}: ") and message in str(e.value), str(e.value)
    assert _leftovers(out) == []


def test_not_hdf5_and_no_task(state_file, tmp_path):
    src, out = tmp_path / "x.h5", tmp_path / "out.zarr"
    shutil.copy(state_file.with_suffix(".json"), src.with_suffix(".json"))
    src.write_bytes(b"not an hdf5 file" * 50)
    with pytest.raises(ManiSkillFileError, match=r"x.h5: /: cannot open as hdf5"):
        convert_maniskill(src, out, lambda info: FACTS, task="pick-cube", progress=False)
    shutil.copy(state_file, src)
    _json(lambda d: d["env_info"].update(env_id="OpenCabinetDrawer-v1"))(src)
    with pytest.raises(ManiSkillFileError, match="'OpenCabinetDrawer-v1' has no difftori task"):
        maniskill.convert_trajectory(src, out)
    assert _leftovers(out) == []
