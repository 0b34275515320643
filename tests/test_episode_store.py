"""EpisodeStore: round trip, diffusion_policy layout, validation errors, atomic and resumable writes."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from difftori.datasets.episode_store import EpisodeStore, StoreError
from store_helpers import small_episode, small_meta

LENGTHS = [7, 3, 12]


def write_store(path: Path, rng, zarr_format: int = 2) -> list[dict[str, np.ndarray]]:
    episodes = [small_episode(rng, n) for n in LENGTHS]
    with EpisodeStore.create(path, small_meta(), zarr_format=zarr_format) as w:
        for i, ep in enumerate(episodes):
            w.add_episode(ep, seed=100 + i)
    return episodes


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip(tmp_path, rng, zarr_format):
    path = tmp_path / "s.zarr"
    episodes = write_store(path, rng, zarr_format)
    store = EpisodeStore(path)
    assert store.zarr_format == zarr_format
    assert store.n_episodes == 3 and store.n_steps == sum(LENGTHS)
    assert store.episode_ends.tolist() == np.cumsum(LENGTHS).tolist()
    assert store.keys == ["action", "point_cloud", "state"]
    for i, ep in enumerate(episodes):
        got = store.episode(i)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
            assert got[k].dtype == ep[k].dtype
    w = store.window(2, 4, 9, keys=["action"])
    np.testing.assert_array_equal(w["action"], episodes[2]["action"][4:9])
    assert store.meta.episode_seeds == [100, 101, 102]
    assert store.meta.n_attempts == 3
    assert set(store.meta.checksums) == {"meta/episode_ends", *(f"data/{k}" for k in store.keys)}
    expected = small_meta(episode_seeds=[100, 101, 102], n_attempts=3, checksums=store.meta.checksums)
    assert store.meta == expected
    assert store.verify().startswith("sha256:")
    with pytest.raises(IndexError):
        store.window(1, 0, 4)
    assert not path.with_name("s.zarr.partial").exists()


def test_diffusion_policy_layout(tmp_path, rng):
    """What diffusion_policy's ReplayBuffer reads: zarr v2, data/<key> concatenated, meta/episode_ends."""
    path = tmp_path / "s.zarr"
    episodes = write_store(path, rng)
    zgroup = json.loads((path / ".zgroup").read_text())
    assert zgroup["zarr_format"] == 2
    meta = json.loads((path / "data" / "point_cloud" / ".zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["compressor"]["id"] == "blosc"
    assert meta["chunks"][1:] == [16, 3]  # chunked along time only
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["meta/episode_ends"][:], np.cumsum(LENGTHS))
    np.testing.assert_array_equal(root["data/action"][:], np.concatenate([e["action"] for e in episodes]))


def _corrupt(path: Path, how: str) -> None:
    root = zarr.open_group(str(path), mode="r+")
    if how == "missing_ends":
        del root["meta/episode_ends"]
    elif how == "length":
        arr = root["data/state"]
        arr.resize((arr.shape[0] - 1, *arr.shape[1:]))
    elif how == "version":
        attrs = dict(root.attrs["difftori"])
        attrs["schema_version"] = 99
        root.attrs["difftori"] = attrs
    elif how == "nan_action":
        root["data/action"][5, 2] = np.nan
    elif how == "inf_obs":
        root["data/point_cloud"][20, 3, 1] = np.inf


@pytest.mark.parametrize(
    "how, key, message",
    [
        ("missing_ends", "meta/episode_ends", "missing"),
        ("length", "data/state", "length 21 does not match the last episode end 22"),
        ("version", "schema_version", "unknown schema version 99"),
        ("nan_action", "data/action", "NaN or inf at step 5"),
        ("inf_obs", "data/point_cloud", "NaN or inf at step 20"),
    ],
)
def test_open_rejects_bad_store(tmp_path, rng, how, key, message):
    path = tmp_path / "s.zarr"
    write_store(path, rng)
    _corrupt(path, how)
    with pytest.raises(StoreError) as e:
        EpisodeStore(path)
    assert str(path) in str(e.value) and key in str(e.value) and message in str(e.value)


def test_open_missing_path(tmp_path):
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / "nope.zarr"))):
        EpisodeStore(tmp_path / "nope.zarr")


@pytest.mark.parametrize("bad_key", ["action", "state"])
def test_nan_on_write_leaves_nothing(tmp_path, rng, bad_key):
    path = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match=f"data/{bad_key}: NaN or inf at step 8"):
        with EpisodeStore.create(path, small_meta()) as w:
            w.add_episode(small_episode(rng, 7), seed=0)
            ep = small_episode(rng, 4)
            ep[bad_key][1, 0] = np.nan
            w.add_episode(ep, seed=1)
    assert list(tmp_path.iterdir()) == []


def test_actions_outside_bounds_are_rejected(tmp_path, rng):
    with pytest.raises(StoreError, match=r"data/action: action .* at step 2 is outside the store's bounds"):
        with EpisodeStore.create(tmp_path / "s.zarr", small_meta()) as w:
            ep = small_episode(rng, 4)
            ep["action"][2, 1] = 1.5
            w.add_episode(ep, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_empty_store_is_rejected_and_leaves_nothing(tmp_path):
    with pytest.raises(StoreError, match="empty store"):
        with EpisodeStore.create(tmp_path / "s.zarr", small_meta()):
            pass
    assert list(tmp_path.iterdir()) == []


def test_wrong_keys_and_shapes_are_rejected(tmp_path, rng):
    with pytest.raises(StoreError, match="episode keys"):
        with EpisodeStore.create(tmp_path / "s.zarr", small_meta()) as w:
            ep = small_episode(rng, 3)
            del ep["state"]
            w.add_episode(ep, seed=0)
    with pytest.raises(StoreError, match=r"data/point_cloud: expected float32\(16, 3\)"):
        with EpisodeStore.create(tmp_path / "s.zarr", small_meta()) as w:
            w.add_episode(small_episode(rng, 3), seed=0)
            ep = small_episode(rng, 3)
            ep["point_cloud"] = ep["point_cloud"][:, :8]
            w.add_episode(ep, seed=1)
    assert list(tmp_path.iterdir()) == []


def test_existing_store_needs_overwrite(tmp_path, rng):
    path = tmp_path / "s.zarr"
    write_store(path, rng)
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(path, small_meta())
    with EpisodeStore.create(path, small_meta(), overwrite=True) as w:
        w.add_episode(small_episode(rng, 2), seed=7)
    assert EpisodeStore(path).n_episodes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_interrupted_write_resumes(tmp_path, rng):
    path = tmp_path / "s.zarr"
    episodes = [small_episode(rng, n) for n in LENGTHS]
    with pytest.raises(KeyboardInterrupt):
        with EpisodeStore.create(path, small_meta()) as w:
            w.add_episode(episodes[0], seed=0)
            w.skip_episode(seed=1)
            w.add_episode(episodes[1], seed=2)
            raise KeyboardInterrupt
    assert not path.exists() and path.with_name("s.zarr.partial").exists()
    # A crash between the array appends and the index append leaves arrays too long.
    torn = zarr.open_group(str(path.with_name("s.zarr.partial")), mode="r+")
    torn["data/state"].append(np.zeros((5, 5), np.float32), axis=0)

    with EpisodeStore.create(path, small_meta(), resume=True) as w:
        assert (w.n_episodes, w.meta.n_attempts) == (2, 3)
        w.add_episode(episodes[2], seed=3)
    store = EpisodeStore(path)
    assert store.meta.episode_seeds == [0, 2, 3] and store.meta.n_attempts == 4
    for i, ep in enumerate(episodes):
        np.testing.assert_array_equal(store.episode(i)["state"], ep["state"])


def test_resume_with_other_params_starts_over(tmp_path, rng):
    path = tmp_path / "s.zarr"
    with pytest.raises(KeyboardInterrupt):
        with EpisodeStore.create(path, small_meta()) as w:
            w.add_episode(small_episode(rng, 3), seed=0)
            raise KeyboardInterrupt
    with EpisodeStore.create(path, small_meta(params={"seed": 1}), resume=True) as w:
        assert w.n_episodes == 0
        w.add_episode(small_episode(rng, 3), seed=5)
    assert EpisodeStore(path).meta.episode_seeds == [5]


def test_meta_validation():
    with pytest.raises(StoreError, match="unknown kinds"):
        small_meta(obs_kinds={"x": "voxels"})
    with pytest.raises(StoreError, match="missing fields"):
        from difftori.datasets.episode_store import StoreMeta

        StoreMeta.from_dict({"schema_version": 1, "task": "t"})


def _set_attrs(path: Path, **changes) -> None:
    root = zarr.open_group(str(path), mode="r+")
    attrs = dict(root.attrs["difftori"])
    for key, value in changes.items():
        if value is None:
            attrs.pop(key, None)
        else:
            attrs[key] = value
    root.attrs["difftori"] = attrs


def test_splits_round_trip_and_version_1_stores(tmp_path, rng):
    """Schema 2 records splits; a version-1 store (no splits field) still opens, with none."""
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path, small_meta()) as w:
        for i, n in enumerate(LENGTHS):
            w.add_episode(small_episode(rng, n), seed=i)
        w.meta.splits = {"train": [0, 2], "valid": [1], "empty": []}
    store = EpisodeStore(path)
    assert store.meta.schema_version == 2
    assert store.meta.splits == {"train": [0, 2], "valid": [1], "empty": []}
    store.verify()
    _set_attrs(path, schema_version=1, splits=None)
    old = EpisodeStore(path)
    assert old.meta.schema_version == 1 and old.meta.splits == {}
    old.verify()


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"valid": [1, 3]}, "splits/valid: episode 3 out of range: the store has 3 episodes"),
        ({"train": [2, 0]}, "splits/train: expected sorted, distinct episode indices"),
        ({"train": "0,1"}, "splits/train: expected sorted, distinct episode indices"),
        (["train"], "splits: expected {name: [episode, ...]}"),
    ],
)
def test_bad_splits_are_rejected(tmp_path, rng, splits, message):
    path = tmp_path / "s.zarr"
    write_store(path, rng)
    _set_attrs(path, splits=splits)
    with pytest.raises(StoreError) as e:
        EpisodeStore(path)
    assert str(path) in str(e.value) and ".zattrs/difftori" in str(e.value) and message in str(e.value)
