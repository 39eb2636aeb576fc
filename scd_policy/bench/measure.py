"""Timing and memory primitives: interleaved rounds, percentiles, peak memory of a callable."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

Key = TypeVar("Key")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def interleaved(
    actions: Mapping[Key, Callable[[], float | None]], rounds: int, warmup: int
) -> dict[Key, list[float]]:
    """Run every action once per round, ``warmup + rounds`` rounds, the start rotating each round so no
    action always runs right after the same neighbour; returns the measured rounds' values per key.

    An action returns its own measurement (e.g. ms per control step over several steps) or None to be
    timed as a whole (wall-clock ms of the call)."""
    keys = list(actions)
    values: dict[Key, list[float]] = {key: [] for key in keys}
    for r in range(warmup + rounds):
        for i in range(len(keys)):
            key = keys[(r + i) % len(keys)]
            start = time.perf_counter()
            measured = actions[key]()
            elapsed_ms = 1000.0 * (time.perf_counter() - start)
            if r >= warmup:
                values[key].append(elapsed_ms if measured is None else measured)
    return values


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min of a list of ms values."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(array, 50)),
        "p90_ms": float(np.percentile(array, 90)),
        "p99_ms": float(np.percentile(array, 99)),
        "mean_ms": float(array.mean()),
        "min_ms": float(array.min()),
        "n": float(array.size),
    }


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), flags=re.MULTILINE)
    return int(match.group(1)) if match else 0


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory (MiB) that ``fn()`` adds on top of what is allocated before it runs.

    CUDA: ``torch.cuda.max_memory_allocated`` over the call minus the allocation before it. CPU: the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set
    before the call — it includes the allocator's working memory and is None where /proc does not allow
    the reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return max(_status_kib("VmHWM") - before, 0) / 1024.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
