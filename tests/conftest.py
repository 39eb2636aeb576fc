"""Shared fixtures: small replay buffers on disk whose values encode their global step index.

``make_episode(start, length)`` builds one episode whose step ``i`` (global step ``g = start + i``)
holds ``state = [g, 10 g]``, ``action = [g + 0.5, -g]`` and a 4x4 RGB ``image`` whose channel ``c``
is ``(10 g + c) % 256`` everywhere, so tests can read back which steps a window gathered.
``make_buffer(lengths)`` writes such episodes, back to back, into a fresh buffer under tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from scd_policy.data.replay_buffer import ReplayBuffer

EpisodeFactory = Callable[..., dict[str, np.ndarray]]
BufferFactory = Callable[..., Path]


def _episode(start: int, length: int, image_size: int = 4) -> dict[str, np.ndarray]:
    steps = np.arange(start, start + length, dtype=np.float32)
    image = (10 * np.arange(start, start + length)[:, None] + np.arange(3)[None, :]) % 256
    return {
        "state": np.stack([steps, 10 * steps], axis=1).astype(np.float32),
        "action": np.stack([steps + 0.5, -steps], axis=1).astype(np.float32),
        "image": np.broadcast_to(
            image[:, None, None, :].astype(np.uint8), (length, image_size, image_size, 3)
        ).copy(),
    }


@pytest.fixture
def make_episode() -> EpisodeFactory:
    return _episode


@pytest.fixture
def make_buffer(tmp_path: Path) -> BufferFactory:
    def build(lengths: Sequence[int], name: str = "buffer.zarr", **meta: object) -> Path:
        path = tmp_path / name
        buffer = ReplayBuffer.create(path, meta=dict(meta) or None)
        start = 0
        for length in lengths:
            buffer.append_episode(_episode(start, length))
            start += length
        return path

    return build
