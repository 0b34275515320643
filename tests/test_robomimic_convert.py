"""convert_robomimic: files in robomimic's own hdf5 layout -> episode stores; every bad file is a
clear error naming file, group and key, and leaves nothing behind."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from difftori.datasets.episode_store import EpisodeStore, StoreError
from difftori.datasets.robomimic_hdf5 import RobomimicFileError, control_mode, convert_robomimic

# robosuite 1.5's composite config, as refactor_composite_controller_config makes it for Panda
OSC = {"type": "OSC_POSE", "input_max": 1, "input_min": -1, "input_type": "delta", "kp": 150}
ENV_ARGS = {
    "env_name": "Lift",
    "type": 1,
    "env_kwargs": {
        "robots": ["Panda"],
        "controller_configs": {
            "type": "BASIC",
            "body_parts": {"right": {**OSC, "gripper": {"type": "GRIP"}}},
        },
        "use_camera_obs": True,
        "camera_names": ["agentview"],
        "camera_heights": 84,
        "camera_widths": 84,
        "reward_shaping": False,
    },
}


def write_robomimic(
    path: Path,
    numbers=(1, 2, 3),
    lengths=None,
    image: bool = True,
    masks=None,
    env_args=ENV_ARGS,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """A file laid out as robomimic's convert_robosuite + dataset_states_to_obs + split_train_val
    write it; returns each demo's arrays (``actions``, ``actions_abs``, ``obs/<key>``)."""
    rng = np.random.default_rng(seed)
    lengths = lengths or [5 + 2 * i for i in range(len(numbers))]
    masks = (
        {"train": [f"demo_{n}" for n in numbers[1:]], "valid": [f"demo_{numbers[0]}"]}
        if masks is None
        else masks
    )
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for n, length in zip(numbers, lengths, strict=True):
            arrays = {
                "actions": rng.uniform(-1, 1, (length, 7)),
                "actions_abs": np.concatenate(
                    [rng.uniform(-0.3, 1.2, (length, 3)), rng.uniform(-3, 3, (length, 4))], 1
                ),
                "obs/robot0_eef_pos": rng.normal(size=(length, 3)),  # float64
                "obs/object": rng.normal(size=(length, 10)).astype(np.float32),
            }
            if image:
                arrays["obs/agentview_image"] = rng.integers(0, 256, (length, 84, 84, 3), dtype=np.uint8)
            g = data.create_group(f"demo_{n}")
            for key, value in arrays.items():
                g.create_dataset(key, data=value)
                if key.startswith("obs/"):
                    g.create_dataset("next_" + key, data=np.roll(value, -1, axis=0))
            g.create_dataset("states", data=rng.normal(size=(length, 32)))
            g.create_dataset("rewards", data=np.zeros(length))
            g.create_dataset("dones", data=np.eye(1, length, length - 1)[0].astype(np.int64))
            g.attrs["num_samples"] = length
            g.attrs["model_file"] = "<mujoco model='base'/>"
            demos[f"demo_{n}"] = arrays
        data.attrs["total"] = sum(lengths)
        data.attrs["env_args"] = json.dumps(env_args, indent=4)
        for name, names in masks.items():
            f[f"mask/{name}"] = np.array(names, dtype="S")
    return demos


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("robomimic")
    demos = write_robomimic(root / "lift.hdf5")
    return demos, convert_robomimic(root / "lift.hdf5", root / "lift.zarr", progress=False)


def test_convert_values_dtypes_and_meta(converted):
    demos, store = converted
    assert store.n_episodes == 3 and store.episode_lengths.tolist() == [5, 7, 9]
    meta = store.meta
    assert (meta.task, meta.suite, meta.source) == ("lift", "robomimic", "robomimic-hdf5:lift.hdf5")
    assert meta.obs_kinds == {"agentview_image": "image", "object": "lowdim", "robot0_eef_pos": "lowdim"}
    assert meta.action_low == [-1.0] * 7 and meta.action_high == [1.0] * 7
    assert meta.control_mode == "OSC_POSE"
    assert meta.episode_seeds == [1, 2, 3]  # demo numbers
    assert meta.splits == {"train": [1, 2], "valid": [0]}
    assert meta.params["env_args"] == ENV_ARGS and meta.params["actions"] == "actions"
    assert meta.params["source_file"].endswith("lift.hdf5")
    assert meta.params["obs_options"] == {
        "use_camera_obs": True,
        "camera_names": ["agentview"],
        "camera_heights": 84,
        "camera_widths": 84,
    }
    for i, demo in enumerate(["demo_1", "demo_2", "demo_3"]):
        ep = store.episode(i)
        src = demos[demo]
        assert ep["robot0_eef_pos"].dtype == np.float32 and ep["object"].dtype == np.float32
        np.testing.assert_array_equal(ep["robot0_eef_pos"], src["obs/robot0_eef_pos"].astype(np.float32))
        np.testing.assert_array_equal(ep["object"], src["obs/object"])
        assert ep["agentview_image"].dtype == np.uint8 and ep["agentview_image"].shape[1:] == (3, 84, 84)
        np.testing.assert_array_equal(
            ep["agentview_image"][:, 2, 10, 20], src["obs/agentview_image"][:, 10, 20, 2]
        )
        np.testing.assert_array_equal(ep["agentview_image"], src["obs/agentview_image"].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(ep["action"], src["actions"].astype(np.float32))
    store.verify()


def test_natural_order_start_number_and_explicit_seeds(tmp_path):
    demos = write_robomimic(
        tmp_path / "f.hdf5", numbers=(10, 2, 0), image=False, masks={"train": ["demo_10"]}
    )
    store = convert_robomimic(tmp_path / "f.hdf5", tmp_path / "s.zarr", seeds=[7, 8, 9], progress=False)
    # demo_0 < demo_2 < demo_10 (not the lexical demo_0 < demo_10 < demo_2)
    for i, demo in enumerate(["demo_0", "demo_2", "demo_10"]):
        np.testing.assert_array_equal(store.episode(i)["action"], demos[demo]["actions"].astype(np.float32))
    assert store.meta.episode_seeds == [7, 8, 9]
    assert store.meta.splits == {"train": [2]}
    assert "agentview_image" not in store.meta.obs_kinds
    assert store.meta.params["env_args"]["env_name"] == "Lift"


def test_actions_abs_and_task_override(tmp_path):
    demos = write_robomimic(tmp_path / "f.hdf5", image=False)
    store = convert_robomimic(
        tmp_path / "f.hdf5",
        tmp_path / "s.zarr",
        actions="actions_abs",
        task="lift_abs",
        params={"seed": 4},
        progress=False,
    )
    all_abs = np.concatenate([d["actions_abs"] for d in demos.values()]).astype(np.float32)
    np.testing.assert_array_equal(store.array("action")[:], all_abs)
    assert store.meta.action_low == np.concatenate([d["actions_abs"] for d in demos.values()]).min(0).tolist()
    assert (
        store.meta.action_high == np.concatenate([d["actions_abs"] for d in demos.values()]).max(0).tolist()
    )
    assert store.meta.params["actions"] == "actions_abs" and store.meta.params["seed"] == 4
    assert store.meta.task == "lift_abs"


def test_control_mode_variants():
    assert control_mode({"env_kwargs": {"controller_configs": {"type": "OSC_POSITION"}}}) == "OSC_POSITION"
    two_arms = {"right": {"type": "OSC_POSE"}, "left": {"type": "OSC_POSE"}}
    nested = {"type": "BASIC", "body_parts": {"arms": two_arms}}
    assert control_mode({"env_kwargs": {"controller_configs": nested}}) == "OSC_POSE"
    mixed = {"body_parts": {"right": {"type": "OSC_POSE"}, "left": {"type": "JOINT_VELOCITY"}}}
    assert control_mode({"env_kwargs": {"controller_configs": mixed}}) == "right=OSC_POSE,left=JOINT_VELOCITY"
    assert control_mode({"env_kwargs": {}}) == "unknown"


def _drop_actions(f):
    del f["data/demo_2/actions"]


def _short_obs(f):
    obs = f["data/demo_3/obs/robot0_eef_pos"]
    value = obs[:-1]
    del f["data/demo_3/obs/robot0_eef_pos"]
    f["data/demo_3/obs/robot0_eef_pos"] = value


def _short_next_obs(f):
    value = f["data/demo_1/next_obs/object"][:, :4]
    del f["data/demo_1/next_obs/object"]
    f["data/demo_1/next_obs/object"] = value


def _set(attr_path: str, value):
    def corrupt(f):
        group, name = attr_path.rsplit("/", 1)
        f[group].attrs[name] = value

    return corrupt


def _bad_mask(f):
    del f["mask/valid"]
    f["mask/valid"] = np.array([b"demo_1", b"demo_9"])


def _stray_group(f):
    f.create_group("data/extra")


def _big_action(f):
    f["data/demo_2/actions"][3, 1] = 1.5


def _float_depth(f):
    f["data/demo_1/obs/agentview_depth"] = np.zeros((5, 8, 8, 1), np.float32)


def _no_obs(f):
    del f["data/demo_1/obs"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_drop_actions, "data/demo_2/actions: missing (the demo has ['actions_abs'])"),
        (_short_obs, "data/demo_3/obs/robot0_eef_pos: 8 steps, but data/demo_3 has num_samples 9"),
        (
            _set("data/demo_3/num_samples", 10),
            "data/demo_3/actions: shape (9, 7), but data/demo_3 has num_samples 10",
        ),
        (
            _short_next_obs,
            "data/demo_1/next_obs/object: float32(4,) per step, but data/demo_1/obs/object has float32(10,)",
        ),
        (_set("data/total", 20), "data/total: attribute is 20, but the demos' num_samples sum to 21"),
        (_set("data/env_args", "{not json"), "data/env_args: not valid json"),
        (
            _set("data/env_args", json.dumps({**ENV_ARGS, "env_name": "Door"})),
            "env_name 'Door' has no known difftori task",
        ),
        (_bad_mask, "mask/valid: names ['demo_9'], which are not demos in data/"),
        (_stray_group, "data/extra: unexpected entry"),
        (_big_action, "data/demo_2/actions: step 3: [-0.031, 1.5, "),
        (_float_depth, "data/demo_1/obs/agentview_depth: float32(5, 8, 8, 1): expected a low-dim (T, D)"),
        (_no_obs, "data/demo_1/obs: missing or empty"),
    ],
)
def test_bad_file_is_named_and_leaves_nothing(tmp_path, corrupt, message):
    src, out = tmp_path / "bad.hdf5", tmp_path / "out.zarr"
    write_robomimic(src, image=False)
    with h5py.File(src, "r+") as f:
        corrupt(f)
    with pytest.raises(RobomimicFileError) as e:
        convert_robomimic(src, out, progress=False)
    assert isinstance(e.value, ValueError) and isinstance(e.value, StoreError)
    assert str(e.value).startswith(f"{src}: ") and message in str(e.value), str(e.value)
    assert leftovers(out) == []


def test_absent_actions_abs(tmp_path):
    src, out = tmp_path / "f.hdf5", tmp_path / "out.zarr"
    write_robomimic(src, image=False)
    with h5py.File(src, "r+") as f:
        for n in (1, 2, 3):
            del f[f"data/demo_{n}/actions_abs"]
    with pytest.raises(
        RobomimicFileError, match=r"f.hdf5: data/demo_1/actions_abs: missing \(the demo has \['actions'\]\)"
    ):
        convert_robomimic(src, out, actions="actions_abs", progress=False)
    assert leftovers(out) == []


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all" * 100, "truncated"])
def test_not_hdf5_or_truncated(tmp_path, content):
    src, out = tmp_path / "x.hdf5", tmp_path / "out.zarr"
    if content == "truncated":
        write_robomimic(src, image=True)
        src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    else:
        src.write_bytes(content)
    with pytest.raises(RobomimicFileError, match=r"x.hdf5: /: cannot open as hdf5"):
        convert_robomimic(src, out, progress=False)
    assert leftovers(out) == []


def test_nan_observation_mid_file_discards_and_keeps_old_store(tmp_path):
    """A bad value found while writing (demo 3 of 3) discards the partial store; an existing
    store given to overwrite is kept unchanged."""
    src, out = tmp_path / "f.hdf5", tmp_path / "out.zarr"
    write_robomimic(src, image=False)
    old = convert_robomimic(src, out, progress=False)
    with h5py.File(src, "r+") as f:
        f["data/demo_3/obs/object"][4, 0] = np.nan
    with pytest.raises(RobomimicFileError, match=r"f.hdf5: data/demo_3/obs/object: NaN or inf at step 4"):
        convert_robomimic(src, out, overwrite=True, progress=False)
    assert leftovers(out) == ["out.zarr"]
    assert EpisodeStore(out).verify() == old.verify()


def test_existing_output_and_seed_count(tmp_path):
    src, out = tmp_path / "f.hdf5", tmp_path / "out.zarr"
    write_robomimic(src, image=False)
    with pytest.raises(ValueError, match="f.hdf5: 2 seeds given for 3 demos"):
        convert_robomimic(src, out, seeds=[1, 2], progress=False)
    convert_robomimic(src, out, progress=False)
    with pytest.raises(StoreError, match="already exists"):
        convert_robomimic(src, out, progress=False)
    store = convert_robomimic(src, out, overwrite=True, seeds=[4, 5, 6], progress=False)
    assert store.meta.episode_seeds == [4, 5, 6]
    assert leftovers(out) == ["out.zarr"]


def test_corrupt_chunk_mid_conversion_leaves_nothing(tmp_path):
    """A compressed chunk that fails to decode is found while writing the last demo."""
    src, out = tmp_path / "f.hdf5", tmp_path / "out.zarr"
    write_robomimic(src, image=False)
    with h5py.File(src, "r+") as f:
        value = f["data/demo_3/obs/object"][()]
        del f["data/demo_3/obs/object"]
        f.create_dataset("data/demo_3/obs/object", data=value, chunks=value.shape, compression="gzip")
        info = f["data/demo_3/obs/object"].id.get_chunk_info(0)
    with open(src, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with pytest.raises(RobomimicFileError, match=r"f.hdf5: data/demo_3/obs/object: unreadable"):
        convert_robomimic(src, out, progress=False)
    assert leftovers(out) == []
