"""Data layer: the zarr replay buffer, windowed datasets and the normaliser."""

from scd_policy.data.dataset import (
    WindowedDataset,
    action_dim,
    images_to_policy,
    input_shapes,
    make_datasets,
    policy_shape,
    split_episodes,
)
from scd_policy.data.normalizer import MODES, Normalizer, fit_normalizer
from scd_policy.data.replay_buffer import (
    ChunkProblem,
    DatasetError,
    DatasetWarning,
    ReplayBuffer,
    is_image_shape,
)

__all__ = [
    "MODES",
    "ChunkProblem",
    "DatasetError",
    "DatasetWarning",
    "Normalizer",
    "ReplayBuffer",
    "WindowedDataset",
    "action_dim",
    "fit_normalizer",
    "images_to_policy",
    "input_shapes",
    "is_image_shape",
    "make_datasets",
    "policy_shape",
    "split_episodes",
]
