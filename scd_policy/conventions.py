"""The library's data conventions, in one place: key names, how an image is recognised, and how a
stored image becomes what a policy reads. Numpy only, so every layer can import it.

- Stored per-step shapes (replay buffers, env observations): images are HWC, 1, 3 or 4 channels, uint8
  0..255 (Diffusion Policy's buffers also hold float 0..255); everything else is low-dimensional.
- Policy shapes (``PolicyConfig.input_shapes``): images are CHW float in [0, 1]; any 3-D shape there
  is an image, because ``policy_shape`` is the only way one gets there. Every other key is a vector:
  a multi-dimensional low-dimensional array (Diffusion Policy's PushT ``keypoint`` (9, 2)) is
  flattened ((18,)), in row-major order, by ``steps_to_policy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ACTION_KEY = "action"  # the policy's name for actions, whatever the dataset calls them
STATE_KEY = "state"  # the proprioceptive / low-dimensional observation of the built-in tasks
PAD_SUFFIX = "_is_pad"  # "<key>_is_pad": (B, T) bool masks of edge-padded steps in a training batch


def is_image_shape(step_shape: Sequence[int]) -> bool:
    """Whether a stored per-step shape is an HWC image (1, 3 or 4 channels)."""
    return len(step_shape) == 3 and int(step_shape[-1]) in (1, 3, 4)


def is_policy_image(shape: Sequence[int]) -> bool:
    """Whether a policy input shape (CHW) is an image."""
    return len(shape) == 3


def policy_shape(step_shape: Sequence[int]) -> list[int]:
    """A stored per-step shape as the policy sees it: HWC images become CHW, anything else a vector."""
    shape = [int(d) for d in step_shape]
    if is_image_shape(shape):
        height, width, channels = shape
        return [channels, height, width]
    return [int(np.prod(shape))] if shape else [1]


def steps_to_policy(values: np.ndarray, step_shape: Sequence[int]) -> np.ndarray:
    """Stored steps (N, *step_shape) -> what the policy reads: images as ``images_to_policy``, other
    keys float32 vectors (N, prod(step_shape))."""
    if is_image_shape(step_shape):
        return images_to_policy(values)
    return np.asarray(values, dtype=np.float32).reshape(len(values), -1)


def images_to_policy(frames: np.ndarray) -> np.ndarray:
    """Stored images (..., H, W, C) with values 0..255 -> float32 (..., C, H, W) in [0, 1].

    Diffusion Policy's PushT buffer stores float32 images in 0..255 too, so the scaling does not
    depend on the dtype.
    """
    return np.moveaxis(frames, -1, -3).astype(np.float32) / np.float32(255.0)


def normalizer_mode(shape: Sequence[int]) -> str:
    """The normaliser mode of a policy input: fixed [0, 1] -> [-1, 1] for images, min-max otherwise."""
    return "image" if is_policy_image(shape) else "min_max"
