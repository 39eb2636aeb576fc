"""The zarr replay buffer: layout, reads, atomic appends, Diffusion Policy (format 2) buffers, bad input."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer, time_chunk_for

BufferFactory = Callable[..., Path]  # fixtures from conftest.py
EpisodeFactory = Callable[..., dict[str, np.ndarray]]


def test_round_trip_and_index(make_buffer: BufferFactory, make_episode: EpisodeFactory) -> None:
    path = make_buffer([3, 5, 2], fps=10, source="scripted expert", card={"task": "push_t"})
    buffer = ReplayBuffer.open(path)
    assert buffer.read_only and buffer.path == path
    assert buffer.n_episodes == 3 and buffer.n_steps == 10
    np.testing.assert_array_equal(buffer.episode_ends, [3, 8, 10])
    np.testing.assert_array_equal(buffer.episode_lengths, [3, 5, 2])
    assert buffer.episode_slice(1) == slice(3, 8)
    assert buffer.episode_slice(-1) == slice(8, 10)
    assert buffer.keys == ["action", "image", "state"]
    assert buffer.shapes == {"action": (2,), "image": (4, 4, 3), "state": (2,)}
    assert buffer.dtypes == {"action": np.float32, "image": np.uint8, "state": np.float32}
    episode = buffer.get_episode(1)
    expected = make_episode(3, 5)
    assert set(episode) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(episode[key], expected[key])
        assert episode[key].dtype == expected[key].dtype
    meta = buffer.meta
    assert meta["fps"] == 10 and meta["source"] == "scripted expert" and meta["card"] == {"task": "push_t"}
    assert meta["keys"] == ["action", "image", "state"]
    assert meta["shapes"] == {"action": [2], "image": [4, 4, 3], "state": [2]}
    assert meta["dtypes"] == {"action": "<f4", "image": "|u1", "state": "<f4"}
    with pytest.raises(IndexError, match="episode index 3 out of range for 3"):
        buffer.episode_slice(3)


def test_on_disk_layout_matches_diffusion_policy(make_buffer: BufferFactory) -> None:
    path = make_buffer([3, 5])
    root = zarr.open_group(path, mode="r")
    assert root.metadata.zarr_format == 3
    ends = root["meta/episode_ends"]
    assert isinstance(ends, zarr.Array)
    assert ends.dtype == np.int64
    np.testing.assert_array_equal(ends[:], [3, 8])
    state = root["data/state"]
    assert isinstance(state, zarr.Array)
    assert state.shape == (8, 2)
    # The dataset record lives in the group attributes, readable without this library.
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["meta"]
    assert attrs["keys"] == ["action", "image", "state"] and attrs["format"] == "scd-policy/replay-buffer"


def test_image_chunks_hold_a_few_frames_and_are_compressed(tmp_path: Path) -> None:
    # 96x96x3 uint8 = 27648 B/frame; a 128 KiB chunk target gives 4 frames (the largest power of 2).
    assert time_chunk_for((96, 96, 3), np.dtype(np.uint8)) == 4
    assert time_chunk_for((10,), np.dtype(np.float32)) == 2048  # 128 KiB / 40 B = 3276 -> 2048
    assert time_chunk_for((512, 512, 3), np.dtype(np.uint8)) == 1
    buffer = ReplayBuffer.create(tmp_path / "b.zarr")
    buffer.append_episode(
        {"image": np.zeros((6, 96, 96, 3), np.uint8), "action": np.zeros((6, 2), np.float32)}
    )
    image = zarr.open_group(tmp_path / "b.zarr", mode="r")["data/image"]
    assert isinstance(image, zarr.Array)
    assert image.chunks == (4, 96, 96, 3)
    codec, checksum = image.compressors
    assert isinstance(codec, BloscCodec) and codec.cname.value == "zstd"
    assert isinstance(checksum, Crc32cCodec)  # last, over the compressed bytes
    # All-zero chunks are written too, so that an absent chunk file can only mean damage.
    assert sorted(p.name for p in (tmp_path / "b.zarr" / "data" / "image" / "c").iterdir()) == ["0", "1"]


def test_get_steps_gathers_any_order_with_repeats(make_buffer: BufferFactory) -> None:
    buffer = ReplayBuffer.open(make_buffer([3, 5, 2]))
    window = np.array([3, 3, 4, 5, 5])  # a padded window: the contiguous-read path
    np.testing.assert_array_equal(buffer.get_steps("state", window)[:, 0], window)
    scattered = np.array([9, 0, 9, 2])  # sparse indices: the orthogonal-gather path
    images = buffer.get_steps("image", scattered)
    assert images.shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(images[:, 0, 0, 0], [90, 0, 90, 20])
    np.testing.assert_array_equal(buffer.get_steps("image", window)[:, 1, 2, 2], [32, 32, 42, 52, 52])
    buffer.cache(["state"])  # the in-memory path gives the same rows
    np.testing.assert_array_equal(buffer.get_steps("state", scattered)[:, 1], [90, 0, 90, 20])
    assert buffer.get_steps("action", np.array([], dtype=np.int64)).shape == (0, 2)
    with pytest.raises(IndexError, match=r"\[0, 10\]"):
        buffer.get_steps("state", np.array([0, 10]))
    with pytest.raises(KeyError, match=r"'depth'.*known keys: \['action', 'image', 'state'\]"):
        buffer.get_steps("depth", np.array([0]))


def test_append_mode_and_meta_updates(make_buffer: BufferFactory, make_episode: EpisodeFactory) -> None:
    path = make_buffer([3], fps=10)
    buffer = ReplayBuffer.open(path, mode="a")
    buffer.cache(["state"])
    buffer.append_episode(make_episode(3, 4))
    np.testing.assert_array_equal(buffer.get_steps("state", np.array([6]))[0], [6, 60])  # cache extended
    buffer.update_meta(fps=20, card={"robot": "sim"})
    reopened = ReplayBuffer.open(path)
    np.testing.assert_array_equal(reopened.episode_ends, [3, 7])
    assert reopened.meta["fps"] == 20 and reopened.meta["card"] == {"robot": "sim"}
    with pytest.raises(DatasetError, match="read-only"):
        reopened.update_meta(fps=1)
    with pytest.raises(DatasetError, match="read-only"):
        reopened.append_episode(make_episode(0, 1))
    with pytest.raises(DatasetError, match=r"\['keys'\] are derived"):
        buffer.update_meta(keys=["x"])
    with pytest.raises(DatasetError, match="JSON"):
        buffer.update_meta(fps=np.float32(1.0))


def _write_dp_buffer(path: Path, lengths: list[int]) -> np.ndarray:
    """A Diffusion-Policy PushT-style buffer written with zarr format 2 (float32 images in 0..255)."""
    n = sum(lengths)
    root = zarr.open_group(path, mode="w", zarr_format=2)
    data, meta = root.require_group("data"), root.require_group("meta")
    rng = np.random.default_rng(0)
    arrays = {
        "action": rng.normal(size=(n, 2)).astype(np.float32),
        "state": rng.normal(size=(n, 5)).astype(np.float32),
        "img": rng.integers(0, 256, size=(n, 96, 96, 3)).astype(np.float32),
        "keypoint": rng.normal(size=(n, 9, 2)).astype(np.float32),
    }
    blosc = numcodecs.Blosc(cname="zstd", clevel=3)
    for key, values in arrays.items():
        array = data.create_array(
            key, shape=values.shape, chunks=(4, *values.shape[1:]), dtype=values.dtype, compressors=blosc
        )
        array[:] = values
    meta.create_array("episode_ends", shape=(len(lengths),), dtype=np.int64)[:] = np.cumsum(lengths)
    return arrays["img"]


def test_opens_diffusion_policy_zarr_format_2_read_only(tmp_path: Path) -> None:
    path = tmp_path / "pusht_cchi_v7_replay.zarr"
    images = _write_dp_buffer(path, [4, 6])
    assert (path / ".zgroup").is_file()
    buffer = ReplayBuffer.open(path)
    assert buffer.zarr_format == 2
    assert buffer.keys == ["action", "img", "keypoint", "state"]
    assert buffer.shapes == {"action": (2,), "img": (96, 96, 3), "keypoint": (9, 2), "state": (5,)}
    np.testing.assert_array_equal(buffer.episode_ends, [4, 10])
    np.testing.assert_array_equal(buffer.get_episode(1)["img"], images[4:10])
    np.testing.assert_array_equal(buffer.get_steps("img", np.array([9, 0])), images[[9, 0]])
    assert buffer.meta["keys"] == buffer.keys and buffer.meta["fps"] is None
    with pytest.raises(DatasetError, match=r"zarr format 2 .* read-only"):
        ReplayBuffer.open(path, mode="a")


# ----------------------------------------------------------------------------- atomic append
def test_crash_before_commit_keeps_previous_episodes(
    make_buffer: BufferFactory, make_episode: EpisodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_buffer([3, 5])
    buffer = ReplayBuffer.open(path, mode="a")

    def crash(self: ReplayBuffer, end: int) -> None:
        raise KeyboardInterrupt("simulated crash after the data arrays were written")

    monkeypatch.setattr(ReplayBuffer, "_commit_episode_end", crash)
    with pytest.raises(KeyboardInterrupt):
        buffer.append_episode(make_episode(100, 4))
    monkeypatch.undo()
    assert zarr.open_array(path / "data" / "state", mode="r").shape == (12, 2)  # residue on disk

    with pytest.warns(UserWarning, match="interrupted append"):
        reader = ReplayBuffer.open(path)
    np.testing.assert_array_equal(reader.episode_ends, [3, 8])
    np.testing.assert_array_equal(reader.get_episode(1)["state"], make_episode(3, 5)["state"])

    writer = ReplayBuffer.open(path, mode="a")  # cuts the residue off
    assert zarr.open_array(path / "data" / "state", mode="r").shape == (8, 2)
    writer.append_episode(make_episode(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean buffer again: no residue warning
        after = ReplayBuffer.open(path)
    np.testing.assert_array_equal(after.episode_ends, [3, 8, 10])
    for key, values in make_episode(8, 2).items():
        np.testing.assert_array_equal(after.get_episode(2)[key], values)


@pytest.mark.parametrize("crash_in", ["__setitem__", "resize"])
def test_crash_at_either_write_of_the_commit(
    make_buffer: BufferFactory, make_episode: EpisodeFactory, monkeypatch: pytest.MonkeyPatch, crash_in: str
) -> None:
    # The commit writes the new end into episode_ends' chunk, then grows its shape (zarr.json). A crash
    # at either write must leave a valid buffer; growing the shape first would expose a bogus last end.
    path = make_buffer([3])
    buffer = ReplayBuffer.open(path, mode="a")
    original = getattr(zarr.Array, crash_in)

    def crashing(self: zarr.Array[Any], *args: Any, **kwargs: Any) -> Any:
        if self.path == "meta/episode_ends":
            raise KeyboardInterrupt(f"simulated crash in episode_ends.{crash_in}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Array, crash_in, crashing)
    with pytest.raises(KeyboardInterrupt):
        buffer.append_episode(make_episode(3, 2))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted append"):
        reader = ReplayBuffer.open(path)
    np.testing.assert_array_equal(reader.episode_ends, [3])
    writer = ReplayBuffer.open(path, mode="a")
    writer.append_episode(make_episode(3, 4))
    after = ReplayBuffer.open(path)
    np.testing.assert_array_equal(after.episode_ends, [3, 7])
    np.testing.assert_array_equal(after.get_episode(1)["state"][:, 0], [3, 4, 5, 6])


def test_crash_in_first_append_lets_the_schema_be_redefined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.zarr"
    buffer = ReplayBuffer.create(path)
    monkeypatch.setattr(ReplayBuffer, "_commit_episode_end", lambda self, end: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        buffer.append_episode({"action": np.zeros((2, 3), np.float32)})
    monkeypatch.undo()
    writer = ReplayBuffer.open(path, mode="a")
    assert writer.keys == [] and writer.n_episodes == 0
    writer.append_episode({"action": np.ones((2, 7), np.float32)})  # another shape: allowed
    assert ReplayBuffer.open(path).shapes == {"action": (7,)}


# ----------------------------------------------------------------------------- bad input
def test_missing_path_and_non_zarr_dirs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no replay buffer at .*nowhere\.zarr.*does not exist"):
        ReplayBuffer.open(tmp_path / "nowhere.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="plain is not a zarr group"):
        ReplayBuffer.open(tmp_path / "plain")
    (tmp_path / "file.zarr").write_text("not zarr")
    with pytest.raises(DatasetError, match="is not a zarr group"):
        ReplayBuffer.open(tmp_path / "file.zarr")
    with pytest.raises(DatasetError, match="mode='w'"):
        ReplayBuffer.open(tmp_path / "plain", mode="w")


def test_group_without_episode_ends_or_data(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "no_ends.zarr", mode="w")
    root.require_group("data").create_array("action", shape=(3, 2), dtype=np.float32)
    with pytest.raises(DatasetError, match="no 'meta/episode_ends'"):
        ReplayBuffer.open(tmp_path / "no_ends.zarr")
    root = zarr.open_group(tmp_path / "no_data.zarr", mode="w")
    root.require_group("meta").create_array("episode_ends", shape=(0,), dtype=np.int64)
    with pytest.raises(DatasetError, match="no 'data' group"):
        ReplayBuffer.open(tmp_path / "no_data.zarr")


def test_unreadable_array(make_buffer: BufferFactory) -> None:
    path = make_buffer([3])
    (path / "data" / "action" / "zarr.json").write_text("{ this is not json")
    with pytest.raises(DatasetError, match="data/action"):
        ReplayBuffer.open(path)
    path = make_buffer([3], name="b2.zarr")
    (path / "meta" / "episode_ends" / "zarr.json").write_text("[]")
    with pytest.raises(DatasetError, match="episode_ends"):
        ReplayBuffer.open(path)


def _set_ends(path: Path, ends: list[int]) -> None:
    array = zarr.open_array(path / "meta" / "episode_ends", mode="r+")
    array.resize((len(ends),))
    array[:] = ends


def test_bad_episode_ends(make_buffer: BufferFactory) -> None:
    path = make_buffer([3, 5])
    _set_ends(path, [3, 3])
    with pytest.raises(DatasetError, match=r"strictly increasing.*entry 1 is 3 after 3"):
        ReplayBuffer.open(path)
    _set_ends(path, [0, 8])
    with pytest.raises(DatasetError, match="starts with 0"):
        ReplayBuffer.open(path)
    _set_ends(path, [3, 12])  # last end past the data
    with pytest.raises(DatasetError, match=r"data/action .* has 8 steps but meta/episode_ends\[-1\] = 12"):
        ReplayBuffer.open(path)


def test_arrays_of_unequal_length_in_file(make_buffer: BufferFactory) -> None:
    path = make_buffer([3, 5])
    zarr.open_array(path / "data" / "state", mode="r+").resize((6, 2))
    with pytest.raises(DatasetError, match=r"data/state .* has 6 steps .* = 8.*'state': 6"):
        ReplayBuffer.open(path)


def test_create_refuses_existing_path_and_derived_meta(make_buffer: BufferFactory, tmp_path: Path) -> None:
    path = make_buffer([2])
    with pytest.raises(DatasetError, match="already exists; pass overwrite=True"):
        ReplayBuffer.create(path)
    fresh = ReplayBuffer.create(path, overwrite=True, meta={"fps": 5})
    assert fresh.n_episodes == 0 and fresh.keys == [] and fresh.meta["fps"] == 5
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a zarr group or an empty folder; refusing"):
        ReplayBuffer.create(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(DatasetError, match=r"\['shapes'\] are derived"):
        ReplayBuffer.create(tmp_path / "x.zarr", meta={"shapes": {}})


@pytest.mark.parametrize(
    ("episode", "message"),
    [
        ({}, "non-empty dict"),
        (
            {"action": np.zeros((3, 2), np.float32), "state": np.zeros((4, 2), np.float32)},
            r"share their length T.*'action': 3, 'state': 4",
        ),
        ({"action": np.zeros((0, 2), np.float32)}, r"at least one step"),
        ({"action": np.float32(1.0)}, "scalar"),
        ({"action": np.array([[0.0, np.nan]], np.float32)}, r"episode\['action'\] holds NaN or inf .*step 0"),
        ({"action": np.array([["a", "b"]])}, "numeric"),
    ],
)
def test_append_rejects_malformed_episodes(tmp_path: Path, episode: dict[str, Any], message: str) -> None:
    buffer = ReplayBuffer.create(tmp_path / "b.zarr")
    with pytest.raises(DatasetError, match=message):
        buffer.append_episode(episode)
    assert buffer.n_episodes == 0


def test_append_must_match_stored_schema(make_buffer: BufferFactory, make_episode: EpisodeFactory) -> None:
    buffer = ReplayBuffer.open(make_buffer([3]), mode="a")
    episode = make_episode(3, 2)
    with pytest.raises(DatasetError, match=r"per-step shape \(3,\); .* stores \(2,\)"):
        buffer.append_episode({**episode, "state": np.zeros((2, 3), np.float32)})
    with pytest.raises(DatasetError, match=r"dtype float64; .* stores float32 \(convert with .astype"):
        buffer.append_episode({**episode, "state": episode["state"].astype(np.float64)})
    missing = {key: value for key, value in episode.items() if key != "image"}
    with pytest.raises(DatasetError, match=r"missing: \['image'\], extra: \[\]"):
        buffer.append_episode(missing)
    with pytest.raises(DatasetError, match=r"missing: \[\], extra: \['reward'\]"):
        buffer.append_episode({**episode, "reward": np.zeros(2, np.float32)})
    nan_state = episode["state"].copy()
    nan_state[1, 0] = np.nan
    with pytest.raises(DatasetError, match=r"episode\['state'\] holds NaN or inf \(first at step 1\)"):
        buffer.append_episode({**episode, "state": nan_state})
    # Nothing was written by the rejected appends.
    assert buffer.n_steps == 3
    assert zarr.open_array(buffer.path / "data" / "state", mode="r").shape == (3, 2)
