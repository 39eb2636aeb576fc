"""The limit of a control step on this machine: its arithmetic, and what the kernels cost at its shapes.

``record_compute(fn)`` runs ``fn`` once under a torch dispatch mode and records every compute kernel it
calls (matrix products, attention, convolutions: the ops ``torch.utils.flop_counter`` counts, plus
the CPU's fused attention kernel), each with its arguments' shapes, strides and dtypes and its FLOPs.
``kernel_ms(op)`` then times that kernel alone on fresh tensors of the same layout, so

- ``kernel_bound_ms`` = sum over the recorded calls of their kernel time: the step if nothing but its
  compute kernels ran (no Python, no dispatch between them, no small element-wise ops), at the shapes a
  batch-1 step really has. Optimistic, so a bound: the timing loop finds each weight in cache, where a
  real step streams them from memory.
- ``flops_bound_ms`` = FLOPs / the machine's best matmul rate (``peak_gflops``, one large square
  product): the step at full arithmetic throughput, what no batch-1 shape reaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

aten = torch.ops.aten
# Fused attention kernels that the flop counter would decompose (into what never runs on the CPU).
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self, generator: torch.Generator) -> torch.Tensor:
        tensor = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        if self.dtype.is_floating_point:
            tensor.copy_(torch.randn(self.shape, generator=generator, dtype=self.dtype))
        else:
            tensor.fill_(1)  # masks: every key visible; indices: in range
        return tensor


@dataclass(frozen=True)
class ComputeOp:
    """One distinct compute-kernel call of a step: the op, its arguments (tensors as specs), FLOPs."""

    func: Any  # a torch OpOverload
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    flops: int

    @property
    def key(self) -> str:
        """Equal for calls of the same kernel on the same layouts (what ``kernel_ms`` times)."""
        return repr((self.func, self.args, self.kwargs))

    def inputs(self, generator: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def build(value: Any) -> Any:
            return value.make(generator) if isinstance(value, TensorSpec) else value

        return tree_map(build, self.args), {key: tree_map(build, value) for key, value in self.kwargs}


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype)
    return value


class _Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's class is untyped
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls: list[ComputeOp] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and packet not in _ATTENTION:
            # Composite ops (linear, matmul, attention: seen whole under inference_mode) run as the
            # kernels they decompose into, which this mode then sees.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        elif packet in _ATTENTION:
            query, key, value = args[:3]
            flops = int(sdpa_flop_count(query.shape, key.shape, value.shape))  # type: ignore[no-untyped-call]
        else:
            return out
        self.calls.append(
            ComputeOp(
                func,
                tree_map(_spec, args),
                tuple((name, tree_map(_spec, value)) for name, value in sorted(kwargs.items())),
                flops,
            )
        )
        return out


def record_compute(fn: Callable[[], object]) -> list[ComputeOp]:
    """The compute kernels ``fn()`` calls, in call order (one entry per call)."""
    recorder = _Recorder()
    with recorder:
        fn()
    return recorder.calls


def kernel_ms(op: ComputeOp, min_time_s: float = 0.02) -> float:
    """Median ms of one call of ``op`` on fresh inputs of its layout (blocks of calls, >= min_time_s)."""
    args, kwargs = op.inputs(torch.Generator().manual_seed(0))
    func = op.func
    for _ in range(3):
        func(*args, **kwargs)
    calls, blocks = 1, []
    while True:  # grow the block until it lasts long enough to time
        start = time.perf_counter()
        for _ in range(calls):
            func(*args, **kwargs)
        elapsed = time.perf_counter() - start
        if elapsed * 5 >= min_time_s:
            break
        calls *= 4
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            func(*args, **kwargs)
        blocks.append(1000.0 * (time.perf_counter() - start) / calls)
    return sorted(blocks)[len(blocks) // 2]


def peak_gflops(size: int = 1024) -> float:
    """GFLOP/s of a (size x size) @ (size x size) float32 product on torch's current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


@dataclass(frozen=True)
class StepBound:
    gflop: float  # per step
    kernel_calls: int
    kernel_bound_ms: float
    flops_bound_ms: float


def step_bound(fn: Callable[[], object], gflops: float, cache: dict[str, float]) -> StepBound:
    """The bounds of one call of ``fn`` (a control step); ``cache`` keeps kernel times across calls."""
    calls = record_compute(fn)
    total = 0.0
    for op in calls:
        if op.key not in cache:
            cache[op.key] = kernel_ms(op)
        total += cache[op.key]
    flops = sum(op.flops for op in calls)
    return StepBound(
        gflop=flops / 1e9,
        kernel_calls=len(calls),
        kernel_bound_ms=total,
        flops_bound_ms=1000.0 * flops / (gflops * 1e9),
    )
