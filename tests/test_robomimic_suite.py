"""The robomimic suite on real robosuite 1.5 + robomimic 0.3.0: scripted experts recorded with
robosuite's DataCollectionWrapper, robomimic's own conversion scripts, the episode store, and the
rollout env rebuilt from the file's env_args (2 demos per task; about a minute on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("robosuite")
pytest.importorskip("robomimic")

from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore  # noqa: E402
from difftori.eval.demos import DemoConfig, generate_demos  # noqa: E402
from difftori.eval.suites import get_suite  # noqa: E402
from difftori.eval.suites import robomimic as rm  # noqa: E402
from difftori.eval.suites.robomimic_compat import apply  # noqa: E402

# robomimic's split_train_val prints the mean length of the validation split, empty with < 10 demos.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Mean of empty slice:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
TASK_ENVS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}


def _make(tmp: Path, task: str, episodes: int = 2, **obs: object) -> tuple[DemoConfig, EpisodeStore]:
    cfg = DemoConfig(suite="robomimic", task=task, episodes=episodes, seed=3, obs=dict(obs))
    return cfg, generate_demos(cfg, tmp / f"{task}.zarr")


@pytest.fixture(scope="module")
def lift(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, EpisodeStore]:
    return _make(tmp_path_factory.mktemp("lift"), "lift")


@pytest.fixture(scope="module")
def can(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, EpisodeStore]:
    return _make(tmp_path_factory.mktemp("can"), "can")


@pytest.fixture(scope="module")
def square(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, EpisodeStore]:
    return _make(tmp_path_factory.mktemp("square"), "square")


@pytest.fixture(scope="module")
def lift_env(lift: tuple[DemoConfig, EpisodeStore]) -> rm.RobomimicEnv:
    env = get_suite("robomimic").env_for_store(lift[1].meta, 400, None)
    yield env
    env.close()


def test_registered_suite_and_horizons() -> None:
    import robomimic

    suite = get_suite("robomimic")
    assert suite.metric == "failure" and suite.obs_config is rm.RobomimicObsConfig
    assert suite.tasks() == ["can", "lift", "square"]
    for task in ("lift", "can", "square", "transport", "tool_hang"):  # robomimic's ph horizons
        assert suite.max_episode_steps(task) == robomimic.DATASET_REGISTRY[task]["ph"]["raw"]["horizon"]
    assert rm.hdf5_path(Path("a/b.zarr")) == Path("a/b.hdf5")
    with pytest.raises(ValueError, match="valid tasks: can, lift, square"):
        rm.env_name("transport")


def test_compat_apply_is_idempotent() -> None:
    first = apply()
    assert apply() == first
    import mujoco_py  # the real one or the stub
    import torchvision  # noqa: F401  (fails with CPU torch without fix 3)
    from robomimic.envs.env_robosuite import EnvRobosuite

    assert issubclass(mujoco_py.builder.MujocoException, Exception)
    assert EnvRobosuite.__init__._difftori_compat  # type: ignore[attr-defined]


def test_old_controller_config_is_converted() -> None:
    import robomimic.utils.env_utils as EnvUtils

    apply()
    old = {"type": "OSC_POSE", "input_max": 1, "input_min": -1, "kp": 150, "damping": 1}
    old |= {"output_max": [0.05] * 3 + [0.5] * 3, "output_min": [-0.05] * 3 + [-0.5] * 3}
    old |= {"impedance_mode": "fixed", "kp_limits": [0, 300], "damping_limits": [0, 10]}
    old |= {"control_delta": True, "uncouple_pos_ori": True, "interpolation": None, "ramp_ratio": 0.2}
    kwargs = {"robots": ["Panda"], "controller_configs": old, "control_freq": 20}
    meta = {"type": 1, "env_name": "Lift", "env_version": "1.4.1", "env_kwargs": kwargs}
    env = EnvUtils.create_env_from_metadata(meta)
    cfg = env.serialize()["env_kwargs"]["controller_configs"]
    assert cfg["body_parts"]["right"]["type"] == "OSC_POSE"
    assert env.env.action_spec[0].shape == (7,)
    env.env.close()


def _check_robomimic_file(path: Path, env_name: str, seeds: list[int], store: EpisodeStore) -> None:
    with h5py.File(path) as f:
        data = f["data"]
        assert sorted(data) == [f"demo_{i + 1}" for i in range(len(seeds))]
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["env_name"] == env_name and env_args["type"] == 1
        kwargs = env_args["env_kwargs"]
        assert kwargs["robots"] == "Panda" and kwargs["control_freq"] == 20
        total = 0
        for i, name in enumerate(sorted(data)):
            demo = data[name]
            t = demo["actions"].shape[0]
            assert demo["actions"].shape == (t, 7) and np.abs(demo["actions"][()]).max() <= 1.0
            assert demo["states"].shape[0] == t and demo.attrs["num_samples"] == t
            assert demo["dones"][-1] == 1 and demo["rewards"][-1] == 1.0  # ends in success
            assert "model_file" in demo.attrs
            assert {"object", "robot0_eef_pos", "robot0_gripper_qpos"} <= set(demo["obs"])
            assert set(demo["obs"]) == set(demo["next_obs"])
            np.testing.assert_array_equal(demo["next_obs/object"][:-1], demo["obs/object"][1:])
            ep = store.episode(i)
            np.testing.assert_allclose(ep[ACTION_KEY], demo["actions"][()], rtol=1e-6)
            np.testing.assert_allclose(ep["object"], demo["obs/object"][()], rtol=1e-6)
            total += t
        assert data.attrs["total"] == total == store.n_steps
        assert set(f["mask"]) == {"train", "valid"}


@pytest.mark.parametrize("task", ["lift", "can", "square"])
def test_demos_make_a_robomimic_file_and_store(task: str, request: pytest.FixtureRequest) -> None:
    cfg, store = request.getfixturevalue(task)
    # The expert succeeded on every attempt, in attempt order.
    assert store.meta.episode_seeds == cfg.attempt_seeds()[:2]
    assert store.n_episodes == 2 and store.meta.suite == "robomimic" and store.meta.task == task
    assert store.meta.control_mode == "OSC_POSE"
    assert store.meta.params["obs"] == {
        "images": False,
        "image_size": 84,
        "cameras": ["agentview", "robot0_eye_in_hand"],
    }
    assert all(v == "lowdim" for v in store.meta.obs_kinds.values())
    _check_robomimic_file(rm.hdf5_path(store.path), TASK_ENVS[task], store.meta.episode_seeds, store)
    assert not list(store.path.parent.glob(f".{store.path.name}.robomimic-*"))  # temp folder gone


def test_expert_success_rate() -> None:
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    rm._imports()
    env = robosuite.make(
        "Lift", controller_configs=load_composite_controller_config(robot="Panda"), **rm.RECORD_KWARGS
    )
    successes = []
    for seed in (11, 12, 13):
        rm.seed_robosuite(env, seed)
        obs, expert = env.reset(), rm.make_expert("lift", env)
        for _ in range(150):
            obs, *_ = env.step(expert(obs))
            if env._check_success():
                break
        successes.append(bool(env._check_success()))
    env.close()
    assert successes == [True, True, True]


def test_reset_seed_is_deterministic_and_reproduces_the_demos(lift, lift_env) -> None:
    _, store = lift
    env = lift_env
    a, _ = env.reset(seed=7)
    state_a = env.robomimic_env.get_state()["states"]
    b, _ = env.reset(seed=8)
    c, _ = env.reset(seed=7)
    np.testing.assert_array_equal(env.robomimic_env.get_state()["states"], state_a)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    assert not np.allclose(a["object"], b["object"])
    with h5py.File(rm.hdf5_path(store.path)) as f:
        for i, seed in enumerate(store.meta.episode_seeds):
            obs, info = env.reset(seed=seed)
            np.testing.assert_array_equal(
                env.robomimic_env.get_state()["states"], f[f"data/demo_{i + 1}/states"][0]
            )
            np.testing.assert_allclose(obs["object"], store.episode(i)["object"][0], rtol=1e-6)
            assert info == {"success": False}


def _replay(env: rm.RobomimicEnv, demo: h5py.Group, actions: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    env.reset(options={"model": demo.attrs["model_file"], "states": demo["states"][0]})
    states, ends = [], []
    for action in actions:
        states.append(env.robomimic_env.get_state()["states"])
        _, _, terminated, truncated, info = env.step(action)
        ends.append(terminated and info["success"] and not truncated)
    return np.array(states), ends


@pytest.mark.parametrize("task", ["lift", "can", "square"])
def test_open_loop_replay_reproduces_the_stored_states(task: str, request: pytest.FixtureRequest) -> None:
    _, store = request.getfixturevalue(task)
    env = get_suite("robomimic").env_for_store(store.meta, 400, None)
    with h5py.File(rm.hdf5_path(store.path)) as f:
        demo = f["data/demo_2"]
        # The file's float64 actions from the recorded model and state: the recorded states exactly.
        states, ends = _replay(env, demo, demo["actions"][()])
        np.testing.assert_allclose(states, demo["states"][()], atol=1e-6)
        assert ends == [False] * (len(ends) - 1) + [True]  # success at the last step, not before
        # The expert acted through the evaluation runner, whose actions are float32: the store's
        # float32 actions are the file's exactly, and replay to the recorded states too.
        stored = store.episode(1)[ACTION_KEY]
        np.testing.assert_array_equal(stored.astype(np.float64), demo["actions"][()])
        states, ends = _replay(env, demo, stored)
        np.testing.assert_allclose(states, demo["states"][()], atol=1e-6)
        assert ends == [False] * (len(ends) - 1) + [True]
    env.close()


def test_env_contract(lift, lift_env) -> None:
    _, store = lift
    env = lift_env
    assert env.control_mode == "OSC_POSE" and env.obs_kinds == store.meta.obs_kinds
    assert env.action_space.shape == (7,) and env.action_space.low.min() == -1.0
    obs, _ = env.reset(seed=1)
    assert set(obs) == set(store.meta.obs_kinds) == set(env.observation_space.spaces)
    for k, v in obs.items():
        assert v.dtype == np.float32 and env.observation_space.spaces[k].shape == v.shape
    frame = env.render()
    assert frame.shape == (rm.RENDER_SIZE, rm.RENDER_SIZE, 3) and frame.dtype == np.uint8 and frame.std() > 5

    short = get_suite("robomimic").env_for_store(store.meta, 3, ["robot0_eef_pos", "object"])
    obs, _ = short.reset(seed=1)
    assert set(obs) == {"robot0_eef_pos", "object"}
    flags = [short.step(np.zeros(7))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    short.close()
    with pytest.raises(ValueError, match="unknown observation keys"):
        get_suite("robomimic").env_for_store(store.meta, 3, ["nope"])


def test_image_demos_are_chw_and_match_the_env(tmp_path: Path) -> None:
    _, store = _make(tmp_path, "lift", episodes=1, images=True, image_size=32, cameras=["agentview"])
    assert store.meta.obs_kinds["agentview_image"] == "image"
    frames = store.episode(0)["agentview_image"]
    assert frames.shape[1:] == (3, 32, 32) and frames.dtype == np.uint8
    with h5py.File(rm.hdf5_path(store.path)) as f:
        hwc = f["data/demo_1/obs/agentview_image"][()]
        np.testing.assert_array_equal(frames, hwc.transpose(0, 3, 1, 2))
    env = get_suite("robomimic").env_for_store(store.meta, 400, ["agentview_image", "object"])
    obs, _ = env.reset(seed=store.meta.episode_seeds[0])
    assert env.observation_space.spaces["agentview_image"].dtype == np.uint8
    np.testing.assert_array_equal(obs["agentview_image"], frames[0])
    env.close()
