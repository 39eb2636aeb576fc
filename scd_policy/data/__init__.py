"""Data layer: the zarr replay buffer, windowed datasets and fitting the normaliser on them.

(``Normalizer`` itself belongs to the policy: ``scd_policy.models.normalizer``; re-exported here.)
"""

from scd_policy.conventions import images_to_policy, is_image_shape, policy_shape
from scd_policy.data.dataset import WindowedDataset, action_dim, input_shapes, make_datasets, split_episodes
from scd_policy.data.replay_buffer import ChunkProblem, DatasetError, DatasetWarning, ReplayBuffer
from scd_policy.data.statistics import fit_normalizer
from scd_policy.models.normalizer import MODES, Normalizer

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
