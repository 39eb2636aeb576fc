"""Windowed dataset: offsets from the policy config, edge padding and masks, splits, make_datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from scd_policy.config import DataConfig, PolicyConfig
from scd_policy.data.dataset import (
    WindowedDataset,
    action_dim,
    input_shapes,
    make_datasets,
    split_episodes,
)
from scd_policy.data.replay_buffer import DatasetError, DatasetWarning, ReplayBuffer

BufferFactory = Callable[..., Path]  # fixture from conftest.py: episodes whose values encode the step

# Episodes of lengths 3, 5, 2 -> global steps [0, 3), [3, 8), [8, 10).
LENGTHS = [3, 5, 2]


def _causal() -> PolicyConfig:
    # obs offsets 0..2, action offsets -1..3 (train_window + horizon = 5 of them).
    return PolicyConfig(type="scd", train_window=3, horizon=2, n_action_steps=2, context_window=3)


def _windowed_dp() -> PolicyConfig:
    # obs offsets -1..0, action offsets -1..2 (the chunk starts n_obs_steps - 1 = 1 step back).
    return PolicyConfig(type="diffusion_policy", n_obs_steps=2, horizon=4, n_action_steps=3)


def _dataset(path: Path, policy: PolicyConfig, episodes: list[int] | None = None) -> WindowedDataset:
    buffer = ReplayBuffer.open(path)
    ids = list(range(buffer.n_episodes)) if episodes is None else episodes
    return WindowedDataset(buffer, ids, ["state", "image"], policy.observation_offsets, policy.action_offsets)


def test_causal_windows_pad_at_episode_start_and_end(make_buffer: BufferFactory) -> None:
    dataset = _dataset(make_buffer(LENGTHS), _causal())
    # A 3-step window is not anchored where it would run past its episode's end; an episode shorter
    # than the window keeps its first step: anchors 0 | 3, 4, 5 | 8.
    assert len(dataset) == 5
    np.testing.assert_array_equal(dataset.anchors, [0, 3, 4, 5, 8])
    # Anchor 3: first step of episode 1. Obs steps 3,4,5; actions 2->3 (clamped), 3,4,5,6.
    sample = dataset[1]
    np.testing.assert_array_equal(sample["state"][:, 0], [3, 4, 5])
    np.testing.assert_array_equal(sample["obs_is_pad"], [False, False, False])
    np.testing.assert_array_equal(sample["action"][:, 1], [-3, -3, -4, -5, -6])
    np.testing.assert_array_equal(sample["action_is_pad"], [True, False, False, False, False])
    # Anchor 5: last anchor of episode 1. Obs 5,6,7; actions 4,5,6,7,8->7.
    sample = dataset[3]
    np.testing.assert_array_equal(sample["state"][:, 0], [5, 6, 7])
    np.testing.assert_array_equal(sample["obs_is_pad"], [False, False, False])
    np.testing.assert_array_equal(sample["action"][:, 0], [4.5, 5.5, 6.5, 7.5, 7.5])
    np.testing.assert_array_equal(sample["action_is_pad"], [False, False, False, False, True])
    # Anchor 8: the 2-step episode [8, 10), shorter than the window. Obs 8,9,10->9; actions 7->8, 8, 9,
    # 10->9, 11->9.
    sample = dataset[4]
    np.testing.assert_array_equal(sample["state"][:, 0], [8, 9, 9])
    np.testing.assert_array_equal(sample["obs_is_pad"], [False, False, True])
    np.testing.assert_array_equal(sample["action"][:, 0], [8.5, 8.5, 9.5, 9.5, 9.5])
    np.testing.assert_array_equal(sample["action_is_pad"], [True, False, False, True, True])
    # Anchor 0 in a 3-step episode: obs 0,1,2 unpadded; actions -1->0, 0,1,2, 3->2.
    sample = dataset[0]
    np.testing.assert_array_equal(sample["obs_is_pad"], [False, False, False])
    np.testing.assert_array_equal(sample["action"][:, 1], [0, 0, -1, -2, -2])
    np.testing.assert_array_equal(sample["action_is_pad"], [True, False, False, False, True])


def test_diffusion_policy_windows(make_buffer: BufferFactory) -> None:
    dataset = _dataset(make_buffer(LENGTHS), _windowed_dp())
    sample = dataset[0]  # obs -1->0, 0; actions -1->0, 0, 1, 2
    np.testing.assert_array_equal(sample["state"][:, 1], [0, 0])
    np.testing.assert_array_equal(sample["obs_is_pad"], [True, False])
    np.testing.assert_array_equal(sample["action"][:, 0], [0.5, 0.5, 1.5, 2.5])
    np.testing.assert_array_equal(sample["action_is_pad"], [True, False, False, False])
    sample = dataset[9]  # last step of episode 2 = [8, 10): obs 8, 9; actions 8, 9, 10->9, 11->9
    np.testing.assert_array_equal(sample["state"][:, 0], [8, 9])
    np.testing.assert_array_equal(sample["obs_is_pad"], [False, False])
    np.testing.assert_array_equal(sample["action"][:, 0], [8.5, 9.5, 9.5, 9.5])
    np.testing.assert_array_equal(sample["action_is_pad"], [False, False, True, True])


def test_sample_types_and_image_layout(make_buffer: BufferFactory) -> None:
    dataset = _dataset(make_buffer(LENGTHS), _windowed_dp())
    sample = dataset[4]  # anchor step 4: obs steps 3, 4
    assert set(sample) == {"state", "image", "action", "obs_is_pad", "action_is_pad"}
    image = sample["image"]
    assert image.dtype == torch.float32 and image.shape == (2, 3, 4, 4)  # (n_obs, C, H, W)
    # Channel c of step g holds (10 g + c) / 255 everywhere.
    expected = torch.tensor([[30.0, 31.0, 32.0], [40.0, 41.0, 42.0]]) / 255.0
    torch.testing.assert_close(image[:, :, 2, 1], expected)
    assert sample["state"].dtype == torch.float32 and sample["state"].shape == (2, 2)
    assert sample["action"].shape == (4, 2)
    assert sample["obs_is_pad"].dtype == torch.bool and sample["action_is_pad"].dtype == torch.bool


def test_episode_subset_and_loader_batches(make_buffer: BufferFactory) -> None:
    dataset = _dataset(make_buffer(LENGTHS), _windowed_dp(), episodes=[2, 0])
    assert len(dataset) == 5  # anchors: episode 2 then episode 0 (8, 9, 0, 1, 2)
    np.testing.assert_array_equal(dataset[1]["state"][:, 0], [8, 9])
    np.testing.assert_array_equal(dataset[2]["state"][:, 0], [0, 0])
    with pytest.raises(IndexError, match="sample index 5 out of range for 5"):
        dataset[5]
    # A worker process reads the zarr images too (fork start; zarr resets its IO loop after fork).
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=1)
    batches = list(loader)
    assert [batch["image"].shape for batch in batches] == [(4, 2, 3, 4, 4), (1, 2, 3, 4, 4)]
    assert batches[0]["action"].shape == (4, 4, 2) and batches[0]["action_is_pad"].shape == (4, 4)


def test_float_images_from_diffusion_policy_buffers(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "dp.zarr", mode="w", zarr_format=2)
    images = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3) * 10  # 0..230
    root.require_group("data").create_array("img", shape=images.shape, dtype=np.float32)[:] = images
    root["data"].create_array("action", shape=(2, 2), dtype=np.float32)[:] = 0  # type: ignore[union-attr]
    root.require_group("meta").create_array("episode_ends", shape=(1,), dtype=np.int64)[:] = [2]
    # zarr skipped writing the all-zero action chunk; in a zarr-2 buffer that is legitimate, so a warning.
    with pytest.warns(DatasetWarning, match="data/action: 1 chunk file.s. absent"):
        buffer = ReplayBuffer.open(tmp_path / "dp.zarr")
    dataset = WindowedDataset(buffer, [0], ["img"], [0], [0])
    torch.testing.assert_close(dataset[1]["img"][0], torch.from_numpy(images[1]).permute(2, 0, 1) / 255.0)
    assert input_shapes(buffer, ["img"]) == {"img": [3, 2, 2]}


# ----------------------------------------------------------------------------- splits
def test_split_is_deterministic_disjoint_and_covering() -> None:
    train, val = split_episodes(10, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(10))
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again = split_episodes(10, 0.2, seed=3)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    vals = {tuple(split_episodes(20, 0.2, seed=s)[1]) for s in range(5)}
    assert len(vals) > 1  # the seed matters


@pytest.mark.parametrize(
    ("n", "ratio", "n_val"), [(1, 0.5, 0), (2, 0.01, 1), (5, 0.0, 0), (3, 0.9, 2), (100, 0.1, 10)]
)
def test_split_sizes(n: int, ratio: float, n_val: int) -> None:
    train, val = split_episodes(n, ratio, seed=0)
    assert len(val) == n_val and len(train) == n - n_val


def test_max_train_episodes_caps_train_and_keeps_val() -> None:
    full_train, full_val = split_episodes(20, 0.25, seed=1)
    train, val = split_episodes(20, 0.25, seed=1, max_train_episodes=4)
    np.testing.assert_array_equal(val, full_val)
    assert len(train) == 4 and set(train) <= set(full_train)
    with pytest.raises(DatasetError, match="no episodes"):
        split_episodes(0, 0.1, seed=0)


# ----------------------------------------------------------------------------- make_datasets
def test_make_datasets_and_shapes(make_buffer: BufferFactory) -> None:
    path = make_buffer([3, 5, 2, 4])
    data = DataConfig(path=str(path), obs_keys=["state", "image"], val_ratio=0.25, split_seed=0)
    train, val, buffer = make_datasets(data, _causal())
    train_ids, val_ids = split_episodes(4, 0.25, seed=0)
    assert len(val_ids) == 1
    # 3-step windows are anchored where they fit in their episode, and once in a shorter one.
    anchors = np.maximum(1, buffer.episode_lengths - 2)  # lengths 3, 5, 2, 4 -> 1, 3, 1, 2
    assert len(train) == int(anchors[train_ids].sum())
    assert len(val) == int(anchors[val_ids].sum())
    assert len(train) + len(val) == 7
    assert train[0]["action"].shape == (5, 2) and train[0]["state"].shape == (3, 2)
    assert input_shapes(buffer, ["state", "image"]) == {"state": [2], "image": [3, 4, 4]}
    assert action_dim(buffer) == 2

    capped, _, _ = make_datasets(DataConfig(path=str(path), max_train_episodes=1, val_ratio=0.25), _causal())
    assert len(capped) == int(anchors[train_ids[0]])  # one train episode only


def test_make_datasets_bad_input(make_buffer: BufferFactory, tmp_path: Path) -> None:
    path = make_buffer([3, 2])
    with pytest.raises(DatasetError, match=r"asks for \['depth'\], but .* holds only \['action', 'image'"):
        make_datasets(DataConfig(path=str(path), obs_keys=["state", "depth"]), _causal())
    with pytest.raises(DatasetError, match=r"\['act'\]"):
        make_datasets(DataConfig(path=str(path), action_key="act"), _causal())
    with pytest.raises(DatasetError, match="does not exist"):
        make_datasets(DataConfig(path=str(tmp_path / "missing.zarr")), _causal())
    with pytest.raises(DatasetError, match=r"data\.path is empty"):
        make_datasets(DataConfig(path=""), _causal())
    with pytest.raises(DatasetError, match=r"per-step shape \(4, 4, 3\); actions must be vectors"):
        action_dim(ReplayBuffer.open(path), "image")
