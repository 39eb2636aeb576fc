"""Damaged replay buffers on disk: deleted, bit-flipped, truncated and emptied chunk files.

Every buffer here is a real one written by ReplayBuffer (or, for the old formats, by zarr the way
those formats were written) under tmp_path; the damage is done to its files, as a failing disk, an
interrupted copy or a stray ``rm`` would. Each test asserts that the message names the array, the
chunk file and what is wrong, so a user can act on it without a traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader
from zarr.codecs import BloscCodec

from scd_policy.cli.common import plain_message
from scd_policy.config import DataConfig, PolicyConfig
from scd_policy.data.dataset import WindowedDataset, make_datasets
from scd_policy.data.replay_buffer import DatasetError, DatasetWarning, ReplayBuffer

EpisodeFactory = Callable[..., dict[str, np.ndarray]]  # the make_episode fixture of tests/conftest.py
LENGTHS = (5, 7, 4)  # 16 steps
# 64x64x3 uint8 frames: 8 per chunk, so the image array has two chunks (steps 0..7 and 8..15).
IMAGE_SIZE = 64


def _policy() -> PolicyConfig:
    return PolicyConfig(type="scd", train_window=3, horizon=2, n_action_steps=2, context_window=3)


@pytest.fixture
def buffer_path(tmp_path: Path, make_episode: EpisodeFactory) -> Path:
    path = tmp_path / "demo.zarr"
    buffer = ReplayBuffer.create(path)
    start = 0
    for length in LENGTHS:
        buffer.append_episode(make_episode(start, length, image_size=IMAGE_SIZE))
        start += length
    return path


def chunk_file(path: Path, name: str, coords: tuple[int, ...]) -> Path:
    """The chunk file of array ``name`` (e.g. "data/state") at ``coords``, by zarr's own key encoding."""
    array = zarr.open_group(path, mode="r")[name]
    assert isinstance(array, zarr.Array)
    return path / name / array.metadata.encode_chunk_key(coords)


def flip_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x04  # in the compressed payload, past the 16-byte blosc header
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def named(file: Path) -> str:
    """A regex that matches the file's full path literally."""
    return re.escape(str(file))


# ----------------------------------------------------------------------------- intact and new format
def test_intact_buffer_verifies_clean_and_is_checksummed(buffer_path: Path) -> None:
    buffer = ReplayBuffer.open(buffer_path)
    assert buffer.checksummed and buffer.meta["format_version"] == 2
    assert buffer.verify() == []
    # episode_ends + state + action (one chunk each) + image (two chunks)
    assert buffer.chunk_count() == 5
    assert chunk_file(buffer_path, "data/image", (1, 0, 0, 0)).is_file()


def test_all_zero_chunks_are_written_also_when_appending_later(tmp_path: Path) -> None:
    # zarr skips chunks equal to the fill value by default, which would make a deleted chunk
    # indistinguishable from an all-zero one: the buffer must write them all, after reopening too.
    path = tmp_path / "zeros.zarr"
    zeros = {"state": np.zeros((3, 2), np.float32), "action": np.zeros((3, 2), np.float32)}
    ReplayBuffer.create(path).append_episode(zeros)
    assert chunk_file(path, "data/state", (0, 0)).is_file()
    appending = ReplayBuffer.open(path, mode="a")
    appending.append_episode({key: np.zeros((8192, 2), np.float32) for key in zeros})  # into chunk 1
    assert chunk_file(path, "data/action", (1, 0)).is_file()
    reopened = ReplayBuffer.open(path)
    assert reopened.verify() == [] and reopened.n_steps == 8195


# ----------------------------------------------------------------------------- missing chunk
def test_missing_chunk_fails_on_open_naming_array_and_file(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/state", (0, 0))
    file.unlink()
    with pytest.raises(DatasetError) as error:
        ReplayBuffer.open(buffer_path)
    message = str(error.value)
    assert "data/state" in message and str(file) in message and str(buffer_path) in message
    assert "is missing" in message and "would read as zeros" in message
    assert "re-collect" in message and f"scd-data check {buffer_path}" in message


def test_missing_chunk_stops_training_before_it_starts(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/action", (0, 0))
    file.unlink()
    data = DataConfig(path=str(buffer_path), obs_keys=["state", "image"], val_ratio=0.25)
    with pytest.raises(DatasetError, match=rf"data/action: chunk file {named(file)} is missing"):
        make_datasets(data, _policy())


def test_damaged_image_chunk_read_in_a_dataloader_worker_is_a_plain_dataset_error(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/image", (0, 0, 0, 0))
    flip_bit(file)
    dataset = WindowedDataset(ReplayBuffer.open(buffer_path), [0], ["state", "image"], [0], [0])
    with pytest.raises(DatasetError) as error:
        next(iter(DataLoader(dataset, batch_size=2, num_workers=1)))
    # torch puts the worker's traceback into the message; scd-train prints only what the worker said.
    message = plain_message(error.value)
    assert message.startswith(f"dataset {buffer_path}: data/image: chunk file {file} fails its CRC-32C")
    assert "Traceback" not in message


def test_scd_train_on_a_damaged_buffer_exits_with_the_message(buffer_path: Path, tmp_path: Path) -> None:
    file = chunk_file(buffer_path, "data/state", (0, 0))
    file.unlink()
    script = Path(sys.executable).with_name("scd-train")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "scd_policy.cli.train"]
    result = subprocess.run(
        [
            *command,
            f"dataset={buffer_path}",
            f"out={tmp_path / 'run'}",
            "data.obs_keys=[state]",
            "train.steps=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = f"scd-train: error: dataset {buffer_path}: data/state: chunk file {file} is missing"
    assert expected in result.stderr


def test_several_missing_chunks_are_listed_together(buffer_path: Path) -> None:
    files = [chunk_file(buffer_path, "data/image", (i, 0, 0, 0)) for i in (0, 1)]
    for file in files:
        file.unlink()
    with pytest.raises(DatasetError, match="2 damaged chunk files") as error:
        ReplayBuffer.open(buffer_path)
    assert all(str(file) in str(error.value) for file in files)


def test_chunk_deleted_after_opening_fails_on_read(buffer_path: Path) -> None:
    buffer = ReplayBuffer.open(buffer_path)
    file = chunk_file(buffer_path, "data/image", (1, 0, 0, 0))
    file.unlink()
    np.testing.assert_array_equal(buffer.get_steps("image", [0, 1])[:, 0, 0, 0], [0, 10])  # chunk 0 is fine
    with pytest.raises(DatasetError, match=rf"data/image: chunk file {named(file)} is missing"):
        buffer.get_steps("image", [8, 9])
    with pytest.raises(DatasetError, match=rf"data/image: chunk file {named(file)} is missing"):
        buffer.get_episode(2)


def test_missing_episode_ends_chunk_is_named(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "meta/episode_ends", (0,))
    file.unlink()
    with pytest.raises(DatasetError, match=rf"meta/episode_ends: chunk file {named(file)} is missing"):
        ReplayBuffer.open(buffer_path)


# ----------------------------------------------------------------------------- bit flip
def test_bit_flip_fails_on_read_and_in_verify(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/image", (1, 0, 0, 0))
    flip_bit(file)
    buffer = ReplayBuffer.open(buffer_path)  # the file is there and not empty: opening is fine
    buffer.get_steps("image", [0, 7])  # the other chunk still reads
    with pytest.raises(DatasetError) as error:
        buffer.get_steps("image", [9, 10])
    message = str(error.value)
    assert f"data/image: chunk file {file} fails its CRC-32C checksum" in message
    assert str(buffer_path) in message and "re-collect" in message
    # The scattered-gather path names it too.
    with pytest.raises(DatasetError, match="fails its CRC-32C checksum"):
        buffer.get_steps("image", [0, 15])
    (problem,) = buffer.verify()
    assert (problem.array, problem.file, problem.kind, problem.fatal) == (
        "data/image",
        file,
        "checksum mismatch",
        True,
    )


def test_bit_flip_in_low_dim_array_fails_when_the_training_data_is_built(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/state", (0, 0))
    flip_bit(file)
    buffer = ReplayBuffer.open(buffer_path)
    for read in (lambda: buffer.load("state"), lambda: buffer.cache(["state"])):
        with pytest.raises(DatasetError, match=rf"data/state: chunk file {named(file)} fails its CRC-32C"):
            read()
    # WindowedDataset keeps low-dim keys in memory, so the damage shows before the first batch.
    with pytest.raises(DatasetError, match=r"data/state: chunk file .* fails its CRC-32C checksum"):
        WindowedDataset(buffer, [0, 1], ["state"], [0], [0, 1])


def test_bit_flip_in_episode_ends_fails_on_open(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "meta/episode_ends", (0,))
    flip_bit(file)
    with pytest.raises(DatasetError, match=rf"meta/episode_ends: chunk file {named(file)} fails its CRC-32C"):
        ReplayBuffer.open(buffer_path)


# ----------------------------------------------------------------------------- truncated / emptied
def test_truncated_chunk_is_named_as_truncated(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/action", (0, 0))
    truncate(file)
    buffer = ReplayBuffer.open(buffer_path)
    with pytest.raises(DatasetError) as error:
        buffer.load("action")
    message = str(error.value)
    assert f"data/action: chunk file {file} is truncated" in message
    assert "bytes on disk, its blosc header says" in message and str(buffer_path) in message
    assert not isinstance(error.value.__cause__, RuntimeError)  # no anonymous blosc error attached
    (problem,) = buffer.verify()
    assert problem.kind == "truncated" and problem.file == file


def test_emptied_chunk_file_fails_on_open(buffer_path: Path) -> None:
    file = chunk_file(buffer_path, "data/image", (0, 0, 0, 0))
    file.write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"data/image: chunk file {named(file)} is truncated .*empty"):
        ReplayBuffer.open(buffer_path)


# ----------------------------------------------------------------------------- older formats
def _write_old_scd_buffer(path: Path) -> None:
    """A buffer as format version 1 wrote it: blosc without checksums, all-zero chunks skipped."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    data, meta = root.require_group("data"), root.require_group("meta")
    values = {
        "state": np.arange(20, dtype=np.float32).reshape(10, 2),
        "action": np.zeros((10, 2), np.float32),  # all zero: zarr leaves its chunk unwritten
    }
    for key, array in values.items():
        data.create_array(
            key,
            shape=array.shape,
            chunks=(8192, 2),
            dtype=array.dtype,
            compressors=BloscCodec(),
            fill_value=0,
        )[:] = array
    ends = meta.create_array("episode_ends", shape=(2,), chunks=(1 << 16,), dtype="int64", fill_value=0)
    ends[:] = [4, 10]
    record = {
        "format": "scd-policy/replay-buffer",
        "format_version": 1,
        "fps": 10,
        "source": None,
        "card": {},
    }
    root.attrs["meta"] = {**record, "keys": ["action", "state"], "shapes": {}, "dtypes": {}}


def test_version_1_buffer_still_opens_with_a_warning_for_absent_zero_chunks(tmp_path: Path) -> None:
    path = tmp_path / "v1.zarr"
    _write_old_scd_buffer(path)
    assert not chunk_file(path, "data/action", (0, 0)).exists()
    with pytest.warns(DatasetWarning, match=r"data/action: 1 chunk file\(s\) absent .*read as 0"):
        buffer = ReplayBuffer.open(path)
    assert not buffer.checksummed and buffer.n_episodes == 2
    np.testing.assert_array_equal(buffer.load("state")[:, 0], np.arange(0, 20, 2))
    np.testing.assert_array_equal(buffer.load("action"), 0)
    (problem,) = buffer.verify()
    assert problem.kind == "absent" and not problem.fatal
    # Appending keeps it version 1 (its old chunks have no checksums) but writes every new chunk.
    with pytest.warns(DatasetWarning):
        appending = ReplayBuffer.open(path, mode="a")
    appending.append_episode({"state": np.ones((2, 2), np.float32), "action": np.zeros((2, 2), np.float32)})
    assert appending.meta["format_version"] == 1
    assert chunk_file(path, "data/action", (0, 0)).exists()


def test_version_1_buffer_still_reports_a_truncated_chunk(tmp_path: Path) -> None:
    path = tmp_path / "v1.zarr"
    _write_old_scd_buffer(path)
    file = chunk_file(path, "data/state", (0, 0))
    truncate(file)
    truncated = rf"data/state: chunk file {named(file)} is truncated"
    # Without a checksum, the blosc header's length is what tells a cut-off file: checked on open...
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match=truncated):
        ReplayBuffer.open(path)
    # ... and before every read (blosc itself may decode a cut-off buffer into garbage).
    buffer = ReplayBuffer.open(path, check_chunks=False)
    with pytest.raises(DatasetError, match=truncated):
        buffer.load("state")


def test_newer_format_version_is_refused(buffer_path: Path) -> None:
    root = zarr.open_group(buffer_path, mode="r+")
    root.attrs["meta"] = {**dict(root.attrs["meta"]), "format_version": 3}  # type: ignore[dict-item]
    with pytest.raises(DatasetError, match="format_version 3; this scd-policy reads versions up to 2"):
        ReplayBuffer.open(buffer_path)


def _write_dp_buffer(path: Path) -> dict[str, np.ndarray]:
    """Diffusion Policy's layout in zarr format 2: data/<key>, meta/episode_ends, blosc, "0.0" keys."""
    root = zarr.open_group(path, mode="w", zarr_format=2)
    data, meta = root.require_group("data"), root.require_group("meta")
    rng = np.random.default_rng(0)
    arrays = {
        "action": rng.normal(size=(10, 2)).astype(np.float32),
        "img": rng.integers(0, 256, size=(10, 8, 8, 3)).astype(np.float32),
    }
    for key, values in arrays.items():
        data.create_array(
            key,
            shape=values.shape,
            chunks=(4, *values.shape[1:]),
            dtype=values.dtype,
            compressors=numcodecs.Blosc(cname="zstd", clevel=3),
        )[:] = values
    meta.create_array("episode_ends", shape=(2,), dtype=np.int64)[:] = [4, 10]
    return arrays


def test_zarr_format_2_buffer_from_diffusion_policy_opens_and_reads(tmp_path: Path) -> None:
    path = tmp_path / "pusht.zarr"
    arrays = _write_dp_buffer(path)
    assert (path / "data" / "img" / "2.0.0.0").is_file()  # the format-2 chunk key encoding
    buffer = ReplayBuffer.open(path)
    assert buffer.zarr_format == 2 and not buffer.checksummed
    np.testing.assert_array_equal(buffer.load("action"), arrays["action"])
    np.testing.assert_array_equal(buffer.get_steps("img", [9, 0]), arrays["img"][[9, 0]])
    assert buffer.verify() == [] and buffer.chunk_count() == 1 + 3 + 3


def test_zarr_format_2_buffer_reports_missing_and_truncated_chunks(tmp_path: Path) -> None:
    path = tmp_path / "pusht.zarr"
    _write_dp_buffer(path)
    absent = path / "data" / "action" / "1.0"
    absent.unlink()
    cut = path / "data" / "img" / "0.0.0.0"
    truncate(cut)
    # zarr format 2 writers may skip all-zero chunks: an absent one is a warning, it reads as 0; a
    # truncated one is an error, on open and before each read.
    warned = rf"data/action: 1 chunk file\(s\) absent \(first: {named(absent)}\)"
    truncated = rf"data/img: chunk file {named(cut)} is truncated"
    with pytest.warns(DatasetWarning, match=warned), pytest.raises(DatasetError, match=truncated):
        ReplayBuffer.open(path)
    buffer = ReplayBuffer.open(path, check_chunks=False)
    np.testing.assert_array_equal(buffer.get_steps("action", [4, 7]), 0)  # chunk 1.0: steps 4..7
    for indices in ([1], [0, 9]):  # the contiguous read and the scattered gather
        with pytest.raises(DatasetError, match=truncated):
            buffer.get_steps("img", indices)
    kinds = {(problem.file, problem.kind) for problem in buffer.verify()}
    assert kinds == {(absent, "absent"), (cut, "truncated")}


# ----------------------------------------------------------------------------- empty dataset
def test_empty_buffer_given_to_training_says_it_has_no_episodes(tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    ReplayBuffer.create(path)
    with pytest.raises(DatasetError, match=r"holds no episodes \(0 steps\), so there is nothing to train on"):
        make_datasets(DataConfig(path=str(path), obs_keys=["state"]), _policy())


# ----------------------------------------------------------------------------- scd-data check
def _scd_data(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("scd-data")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "scd_policy.cli.data"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def test_scd_data_check_intact_buffer_exits_0(buffer_path: Path) -> None:
    result = _scd_data("check", str(buffer_path))
    assert result.returncode == 0, result.stderr
    assert f"{buffer_path}: intact (3 episodes, 16 steps, 4 arrays, 5 chunks read" in result.stdout
    assert "CRC-32C checksums verified" in result.stdout
    assert result.stderr == ""  # not a terminal: no progress bar, and nothing else to say


def test_scd_data_check_lists_every_damaged_chunk(buffer_path: Path) -> None:
    flipped = chunk_file(buffer_path, "data/image", (1, 0, 0, 0))
    flip_bit(flipped)
    missing = chunk_file(buffer_path, "data/state", (0, 0))
    missing.unlink()
    result = _scd_data("check", str(buffer_path), "--no-progress")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()  # arrays in name order: episode_ends, action, image, state
    assert (
        f"scd-data check: error: {buffer_path}: data/image: chunk file {flipped} fails its CRC-32C"
        in lines[0]
    )
    assert f"data/state: chunk file {missing} is missing" in lines[1]
    assert "is damaged: 2 bad chunk file(s)" in lines[2] and "re-collect" in lines[2]
    assert len(lines) == 3


def test_scd_data_check_old_format_warns_and_strict_fails(tmp_path: Path) -> None:
    path = tmp_path / "v1.zarr"
    _write_old_scd_buffer(path)
    relaxed = _scd_data("check", str(path))
    assert relaxed.returncode == 0 and "intact" in relaxed.stdout
    assert "warning:" in relaxed.stderr and "data/action: chunk file" in relaxed.stderr
    assert "no checksums in this older format" in relaxed.stdout
    strict = _scd_data("check", "--strict", str(path))
    assert strict.returncode == 1 and "is damaged: 1 bad chunk file(s)" in strict.stderr


def test_scd_data_check_not_a_buffer_and_help(tmp_path: Path) -> None:
    result = _scd_data("check", str(tmp_path / "nothing.zarr"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no replay buffer at" in result.stderr and "does not exist" in result.stderr
    helped = _scd_data("check", "--help")
    assert helped.returncode == 0 and "usage: scd-data check" in helped.stdout and "--strict" in helped.stdout
    top = _scd_data("--help")
    assert top.returncode == 0 and "check" in top.stdout
    assert _scd_data().returncode == 2  # no command: a usage error
