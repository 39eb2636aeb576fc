"""Per-key normalisation of policy inputs and actions, fitted once and saved with the weights.

The normaliser is part of the policy (a submodule: its statistics travel in the policy's state_dict),
so it lives with the networks and needs no data layer: loading a policy for deployment does not import
zarr. Fitting it on a replay buffer is the data layer's job (``scd_policy.data.statistics``).

Every mode is an affine map ``x_norm = (x - offset) / scale`` with per-key buffers:

- ``"min_max"``: offset = (max + min) / 2, scale = (max - min) / 2, so the data spans [-1, 1];
- ``"mean_std"``: offset = mean, scale = std;
- ``"image"``: images already in [0, 1] map to [-1, 1] (offset 0.5, scale 0.5); no statistics.

A dimension whose half-range (or std) is below ``CONSTANT_TOLERANCE`` keeps scale 1, so its data maps to
0 without dividing by ~0, and ``unnormalize`` stays the exact inverse. Image-shaped keys (C, H, W)
get per-channel statistics of shape (C, 1, 1); other keys per-element statistics of their shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MODES = ("min_max", "mean_std", "image")
CONSTANT_TOLERANCE = 1e-6


def stat_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of a key's statistics: per channel for CHW images, per element otherwise."""
    shape = tuple(int(d) for d in shape)
    return (shape[0], 1, 1) if len(shape) == 3 else shape


def _module_name(key: str) -> str:
    # nn.Module names may not contain "."; LeRobot-style keys ("observation.state") do.
    return key.replace(".", "_dot_")


@dataclass
class RunningStats:
    """Min, max, mean and std accumulated over batches of samples (float64, per stat element)."""

    count: int
    total: np.ndarray
    total_sq: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def empty(cls, stat_shape: tuple[int, ...]) -> RunningStats:
        return cls(
            0,
            np.zeros(stat_shape),
            np.zeros(stat_shape),
            np.full(stat_shape, np.inf),
            np.full(stat_shape, -np.inf),
        )

    def update(self, x: np.ndarray) -> None:
        """Add samples x (N, *shape); reduces over N and, for per-channel stats, over H and W."""
        x = np.asarray(x, dtype=np.float64)
        axes = (0, 2, 3) if x.ndim == 4 and self.total.ndim == 3 else (0,)
        self.count += int(np.prod([x.shape[a] for a in axes]))
        self.total += x.sum(axis=axes, keepdims=len(axes) > 1).reshape(self.total.shape)
        self.total_sq += np.square(x).sum(axis=axes, keepdims=len(axes) > 1).reshape(self.total.shape)
        self.low = np.minimum(self.low, x.min(axis=axes, keepdims=len(axes) > 1).reshape(self.low.shape))
        self.high = np.maximum(self.high, x.max(axis=axes, keepdims=len(axes) > 1).reshape(self.high.shape))

    def offset_scale(self, mode: str) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("cannot fit normalisation statistics on zero samples")
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 0.0))
        return affine_from_stats(mode, low=self.low, high=self.high, mean=mean, std=std)


def affine_from_stats(
    mode: str,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (offset, scale) of a mode from summary statistics — the one home of the formula (min_max
    needs low/high, mean_std needs mean/std); also used for statistics computed elsewhere (LeRobot's)."""
    if mode == "min_max":
        if low is None or high is None:
            raise ValueError("min_max normalisation needs min and max statistics")
        offset, scale = (high + low) / 2, (high - low) / 2
    elif mode == "mean_std":
        if mean is None or std is None:
            raise ValueError("mean_std normalisation needs mean and std statistics")
        offset, scale = mean, std
    else:
        raise ValueError(f"mode {mode!r} has no statistics to fit; expected 'min_max' or 'mean_std'")
    # Constant dimension: leave it unscaled so it maps to 0 and inverts exactly.
    return offset, np.where(scale < CONSTANT_TOLERANCE, 1.0, scale)


class _KeyStats(nn.Module):
    """The two buffers of one key; registered so they travel in the policy's state_dict."""

    offset: torch.Tensor
    scale: torch.Tensor

    def __init__(self, stat_shape: tuple[int, ...], offset: float, scale: float) -> None:
        super().__init__()
        self.register_buffer("offset", torch.full(stat_shape, offset, dtype=torch.float32))
        self.register_buffer("scale", torch.full(stat_shape, scale, dtype=torch.float32))


class Normalizer(nn.Module):
    """Affine per-key normalisation (see the module docstring); a submodule of every policy."""

    fitted: torch.Tensor

    def __init__(self, shapes: Mapping[str, Sequence[int]], modes: Mapping[str, str]) -> None:
        super().__init__()
        if set(shapes) != set(modes):
            raise KeyError(
                f"normaliser shapes and modes must name the same keys; shapes: {sorted(shapes)}, "
                f"modes: {sorted(modes)}"
            )
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.modes: dict[str, str] = dict(modes)
        self.keys: list[str] = list(shapes)
        self.stats = nn.ModuleDict()
        for key in self.keys:
            mode = self.modes[key]
            if mode not in MODES:
                raise ValueError(f"normaliser mode {mode!r} for key {key!r}; expected one of {MODES}")
            if mode == "image" and len(self.shapes[key]) != 3:
                raise ValueError(f"key {key!r} has mode 'image' but shape {self.shapes[key]}, not (C, H, W)")
            # Image mode is fixed (offset 0.5, scale 0.5); other modes start as identity until fitted.
            fixed = (0.5, 0.5) if mode == "image" else (0.0, 1.0)
            self.stats[_module_name(key)] = _KeyStats(stat_shape(self.shapes[key]), *fixed)
        # Persistent, so a loaded state_dict from a fitted normaliser counts as fitted.
        needs_stats = any(mode != "image" for mode in self.modes.values())
        self.register_buffer("fitted", torch.tensor(not needs_stats))

    @classmethod
    def fit(cls, data: Mapping[str, np.ndarray | torch.Tensor], modes: Mapping[str, str]) -> Normalizer:
        """Fit on samples ``data[key]`` of shape (N, *shape) (images already CHW in [0, 1])."""
        missing = sorted(set(modes) - set(data))
        if missing:
            raise KeyError(f"no data for normaliser keys {missing}; data has {sorted(data)}")
        arrays = {key: _to_numpy(data[key]) for key in modes}
        normalizer = cls({key: arrays[key].shape[1:] for key in modes}, modes)
        for key, mode in modes.items():
            if mode != "image":
                stats = RunningStats.empty(stat_shape(normalizer.shapes[key]))
                stats.update(arrays[key])
                normalizer.set_stats(key, *stats.offset_scale(mode))
        normalizer.fitted.fill_(True)
        return normalizer

    def set_stats(self, key: str, offset: np.ndarray, scale: np.ndarray) -> None:
        """Write a key's offset/scale (broadcast to its statistics shape)."""
        stats = self._stats(key)
        for buffer, values in ((stats.offset, offset), (stats.scale, scale)):
            buffer.copy_(torch.from_numpy(np.array(np.broadcast_to(values, buffer.shape), dtype=np.float32)))

    def stats_arrays(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """A key's offset and scale as float32 numpy arrays (copies): ``normalize`` is
        ``(x - offset) / scale``."""
        stats = self._stats(key)
        return stats.offset.detach().cpu().numpy().copy(), stats.scale.detach().cpu().numpy().copy()

    def _stats(self, key: str) -> _KeyStats:
        if key not in self.shapes:
            raise KeyError(f"normaliser has no key {key!r}; known keys: {self.keys}")
        module = self.stats[_module_name(key)]
        assert isinstance(module, _KeyStats)
        return module

    def _checked(self, key: str, x: torch.Tensor) -> _KeyStats:
        stats = self._stats(key)
        if not bool(self.fitted):
            raise RuntimeError(
                "the normaliser is not fitted: build it with Normalizer.fit / fit_normalizer, or load a "
                "checkpoint's state_dict"
            )
        shape = self.shapes[key]
        if tuple(x.shape[x.ndim - len(shape) :]) != shape or x.ndim < len(shape):
            expected = ", ".join(map(str, shape))
            raise ValueError(f"{key!r}: expected a tensor (..., {expected}), got {tuple(x.shape)}")
        return stats

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Raw values (..., *shape) -> normalised values of the same shape."""
        stats = self._checked(key, x)
        x = x if x.is_floating_point() else x.float()
        return (x - stats.offset.to(x.dtype)) / stats.scale.to(x.dtype)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Normalised values (..., *shape) -> raw units; the exact inverse of ``normalize``."""
        stats = self._checked(key, x)
        x = x if x.is_floating_point() else x.float()
        return x * stats.scale.to(x.dtype) + stats.offset.to(x.dtype)

    def normalize_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalise every known key; ``*_is_pad`` masks pass through; any other key raises KeyError."""
        out: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if key.endswith("_is_pad"):
                out[key] = value
            elif key in self.shapes:
                out[key] = self.normalize(key, value)
            else:
                raise KeyError(
                    f"batch key {key!r} has no normalisation statistics; known keys: {self.keys} "
                    "(plus *_is_pad masks)"
                )
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{key}: {self.modes[key]} {list(self.shapes[key])}" for key in self.keys)


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
