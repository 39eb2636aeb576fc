"""Windowed training samples over a replay buffer, at the time offsets the policy config asks for.

Every step of every selected episode is an anchor ``t``. A sample holds, for each offset ``o`` in
``PolicyConfig.observation_offsets`` / ``action_offsets``, the step ``t + o`` clamped to the anchor's
episode (edge padding), and masks ``obs_is_pad`` / ``action_is_pad`` marking the clamped positions.
Values stay in raw units; the policy's normaliser scales them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scd_policy.config import DataConfig, PolicyConfig
from scd_policy.conventions import is_image_shape, policy_shape, steps_to_policy
from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer


def split_episodes(
    n_episodes: int, val_ratio: float, seed: int, max_train_episodes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode train/val split, deterministic under ``seed``; both id arrays sorted.

    At least one validation episode when ``val_ratio > 0`` and there are >= 2 episodes, none for a
    single episode. The validation set does not depend on ``max_train_episodes`` (the cap keeps a
    seeded subset of the remaining episodes), so data-scaling runs share one validation set.
    """
    if n_episodes < 1:
        raise DatasetError("cannot split a buffer with no episodes; record some episodes first")
    if not 0.0 <= val_ratio < 1.0:
        raise DatasetError(f"val_ratio={val_ratio} must be in [0, 1)")
    if max_train_episodes is not None and max_train_episodes < 1:
        raise DatasetError(f"max_train_episodes={max_train_episodes} must be >= 1 (or None for all)")
    n_val = 0
    if val_ratio > 0 and n_episodes >= 2:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    order = np.random.default_rng(seed).permutation(n_episodes)
    val_ids, train_ids = order[:n_val], order[n_val:]
    if max_train_episodes is not None:
        train_ids = train_ids[:max_train_episodes]
    return np.sort(train_ids).astype(np.int64), np.sort(val_ids).astype(np.int64)


def input_shapes(buffer: ReplayBuffer, obs_keys: Sequence[str]) -> dict[str, list[int]]:
    """Per-step observation shapes as the policy sees them (images CHW), for PolicyConfig.input_shapes."""
    require_keys(buffer, obs_keys, "data.obs_keys")
    return {key: policy_shape(buffer.shapes[key]) for key in obs_keys}


def action_dim(buffer: ReplayBuffer, action_key: str = "action") -> int:
    """Size of one action vector, for PolicyConfig.action_dim."""
    require_keys(buffer, [action_key], "data.action_key")
    shape = buffer.shapes[action_key]
    if len(shape) != 1:
        raise DatasetError(
            f"data/{action_key} in {buffer.path} has per-step shape {shape}; actions must be vectors (Da,)"
        )
    return shape[0]


def require_keys(buffer: ReplayBuffer, keys: Sequence[str], setting: str) -> None:
    missing = [key for key in keys if key not in buffer.keys]
    if missing:
        raise DatasetError(
            f"{setting} asks for {missing}, but {buffer.path} holds only {buffer.keys}; "
            f"set {setting} to keys the dataset has"
        )


class WindowedDataset(Dataset[dict[str, torch.Tensor]]):
    """Samples anchored at the steps of the selected episodes, gathered at fixed time offsets with edge
    padding.

    Every step is an anchor, except that an observation window reaching past the anchor (the causal
    policies' trajectory windows, offsets 0..W-1) is not anchored where it would run past the
    episode's end: those windows would be mostly padding, masked out of the loss, i.e. wasted compute.
    An episode shorter than the window keeps one anchor, at its first step.
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        episode_ids: Sequence[int] | np.ndarray,
        obs_keys: Sequence[str],
        obs_offsets: Sequence[int],
        action_offsets: Sequence[int],
        action_key: str = "action",
    ) -> None:
        require_keys(buffer, obs_keys, "data.obs_keys")
        action_dim(buffer, action_key)  # checks the key exists and is a vector
        if not obs_offsets or not action_offsets:
            raise DatasetError("observation and action offsets must each list at least one time offset")
        self.buffer = buffer
        self.obs_keys = list(obs_keys)
        self.action_key = action_key
        self.episode_ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        self.obs_offsets = np.asarray(obs_offsets, dtype=np.int64)
        self.action_offsets = np.asarray(action_offsets, dtype=np.int64)
        self._images = {key for key in self.obs_keys if is_image_shape(buffer.shapes[key])}
        # Low-dimensional arrays are small: keep them in memory; images are read per window from zarr.
        buffer.cache([key for key in [*self.obs_keys, action_key] if key not in self._images])

        reach = max(0, int(self.obs_offsets.max()))  # how far past its anchor a window's observations go
        starts, ends, anchors = [], [], []
        for episode in self.episode_ids:
            span = buffer.episode_slice(int(episode))
            last_anchor = max(span.start, span.stop - 1 - reach)
            length = last_anchor + 1 - span.start
            anchors.append(np.arange(span.start, last_anchor + 1, dtype=np.int64))
            starts.append(np.full(length, span.start, dtype=np.int64))
            ends.append(np.full(length, span.stop, dtype=np.int64))
        empty = np.zeros(0, dtype=np.int64)
        self._anchor = np.concatenate(anchors) if anchors else empty
        self._start = np.concatenate(starts) if starts else empty
        self._stop = np.concatenate(ends) if ends else empty

    def __len__(self) -> int:
        return int(self._anchor.shape[0])

    @property
    def anchors(self) -> np.ndarray:
        """The global step index each sample is anchored at, (len(self),) int64."""
        return self._anchor.copy()

    def window_indices(self, index: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step indices of sample ``index`` at ``offsets``, clamped to its episode, and the pad mask."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        wanted = self._anchor[index] + offsets
        first, last = self._start[index], self._stop[index] - 1
        return np.clip(wanted, first, last), (wanted < first) | (wanted > last)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        obs_idx, obs_pad = self.window_indices(index, self.obs_offsets)
        act_idx, act_pad = self.window_indices(index, self.action_offsets)
        sample: dict[str, torch.Tensor] = {}
        for key in self.obs_keys:
            values = steps_to_policy(self.buffer.get_steps(key, obs_idx), self.buffer.shapes[key])
            sample[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        actions = self.buffer.get_steps(self.action_key, act_idx)
        sample["action"] = torch.from_numpy(np.ascontiguousarray(actions, dtype=np.float32))
        sample["obs_is_pad"] = torch.from_numpy(obs_pad)
        sample["action_is_pad"] = torch.from_numpy(act_pad)
        return sample


def make_datasets(
    data_cfg: DataConfig, policy_cfg: PolicyConfig
) -> tuple[WindowedDataset, WindowedDataset, ReplayBuffer]:
    """Open ``data_cfg.path`` read-only, split its episodes and build the train and val datasets.

    Damage surfaces here, as ``DatasetError``, before any training step: opening checks that every
    chunk file exists, and building the datasets reads (and so checksums) the low-dimensional arrays
    whole. Image chunks are read per window, so a corrupt one is reported when a batch reaches it;
    ``scd-data check`` finds those up front.
    """
    if not data_cfg.path:
        raise DatasetError("data.path is empty; set it to a replay buffer directory (.zarr)")
    buffer = ReplayBuffer.open(data_cfg.path, mode="r")
    if buffer.n_episodes == 0:
        # Checked before the keys: an empty buffer has no arrays yet, and "holds only []" would
        # send the user looking at data.obs_keys instead of at the recording.
        raise DatasetError(
            f"{buffer.path} holds no episodes (0 steps), so there is nothing to train on; record "
            "episodes into it first (e.g. with scd-collect) or point data.path at another buffer"
        )
    require_keys(buffer, [*data_cfg.obs_keys, data_cfg.action_key], "data.obs_keys/data.action_key")
    train_ids, val_ids = split_episodes(
        buffer.n_episodes, data_cfg.val_ratio, data_cfg.split_seed, data_cfg.max_train_episodes
    )

    def build(ids: np.ndarray) -> WindowedDataset:
        return WindowedDataset(
            buffer,
            ids,
            data_cfg.obs_keys,
            policy_cfg.observation_offsets,
            policy_cfg.action_offsets,
            action_key=data_cfg.action_key,
        )

    return build(train_ids), build(val_ids), buffer
