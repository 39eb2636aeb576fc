"""KV cache over control steps for block-causal transformers.

A cache serves B streams (environments) that advance together: every call appends the same number of
steps to every stream, so all streams share one length (``n_steps``). A stream can still be restarted
on its own: ``reset(streams)`` marks that stream's cached steps invalid, and attention masks them out,
which is exactly equivalent to the stream having no history (softmax over the remaining keys, and RoPE
scores depend only on relative positions). A runtime that would rather not carry masked steps keeps
one cache per environment (B = 1); ``StackedCache`` runs one batched call over several such caches
(a policy server's sessions, each at its own step).

Sliding window (``max_steps`` = N). Every layer of a step attends to the last N steps (its own
included): sliding-window attention, as in Mistral. Keys are stored *already rotated* to their step's
absolute number (``first_step`` counts the evicted steps; angles are computed in float64, so they stay
exact however long the episode runs). RoPE scores depend only on step differences, so a query rotated
to its own absolute step sees exactly the scores a renumbering from 0 would give, and nothing cached
is ever re-rotated. Consequences, all tested:

- stepping one step at a time with eviction equals one pass over the *whole* history with the
  N-step window mask (``begin`` builds that mask for multi-step calls too), so a streaming runtime and
  ``predict_chunk`` on the full history agree exactly, and memory stays flat;
- for a single layer this also equals a fresh pass over the last N steps only. With more layers it does
  not: the retained steps' deeper keys/values were computed while older steps were still visible, so
  information from up to L * N steps back can reach the newest step (the receptive field of any
  sliding-window transformer). Exact "fresh pass over the last N steps" would mean re-encoding N steps
  per control step, which is what the cache exists to avoid.

Storage: per layer one preallocated buffer (B, heads, capacity, head_dim) holding the kept tokens as a
contiguous slice. A call writes its new keys/values right after that slice (``extend``) and attends over
a view of buffer + new tokens, so a control step costs O(new tokens), not a copy of the whole window.
When the buffer is full, the kept tokens move into a *fresh* buffer of twice the window (O(window) once
every ~window steps: amortised O(1)). Tensors handed out earlier (``keys``/``values``, a ``History``, a
``copy()``) are never written: writes land only past every earlier view's end, and a shared buffer is
re-allocated before it is written.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from scd_policy.models.layers import rope_at, rope_cos_sin

# Smallest buffer (in tokens) for caches without a window, which grow by doubling.
_MIN_CAPACITY = 64


@dataclass(frozen=True)
class StepPlan:
    """What the layers of one call need: rotations for the new tokens, and the mask."""

    # For the new tokens at their absolute steps: (1, N_new, head_dim), or (R, 1, N_new, head_dim) per
    # row (StackedCache).
    rope: tuple[Tensor, Tensor]
    mask: Tensor | None  # bool (B, 1, N_new, M + N_new); None when every key is visible to every query
    n_old_steps: int
    n_new_steps: int


class KVCache:
    """Per-layer keys (rotated) and values (B, heads, n_steps * tokens_per_step, head_dim) of the last
    steps, in preallocated buffers (see the module docstring)."""

    def __init__(self, n_layers: int, max_steps: int | None = None) -> None:
        if n_layers < 1:
            raise ValueError(f"a KV cache needs at least one layer, got n_layers={n_layers}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for unbounded), got {max_steps}")
        self.n_layers = n_layers
        self.max_steps = max_steps
        self.valid: Tensor | None = None  # (B, n_steps) bool: False for steps of a reset stream
        self.n_steps = 0
        self.first_step = 0  # absolute step number of the oldest kept step (RoPE position)
        self.tokens_per_step = 0
        self._k: list[Tensor] = []  # per layer (B, heads, capacity, head_dim)
        self._v: list[Tensor] = []
        self._start = 0  # kept tokens: buffer[:, :, start:end]
        self._end = 0
        self._shared = False  # buffers shared with a copy(): re-allocate before writing
        self._all_valid = True  # no kept step of a reset stream (skips mask work)

    # ------------------------------------------------------------------ views

    @property
    def keys(self) -> list[Tensor]:
        """Per layer, the kept keys rotated to their absolute steps, (B, heads, M, head_dim)."""
        return [k[:, :, self._start : self._end] for k in self._k]

    @property
    def values(self) -> list[Tensor]:
        """Per layer, the kept values, (B, heads, M, head_dim)."""
        return [v[:, :, self._start : self._end] for v in self._v]

    @property
    def batch_size(self) -> int | None:
        return None if self.valid is None else int(self.valid.shape[0])

    def nbytes(self) -> int:
        """Bytes of the key/value buffers (allocated capacity) and validity flags."""
        tensors = [*self._k, *self._v, *([] if self.valid is None else [self.valid])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def copy(self) -> KVCache:
        """A snapshot: later appends/evictions of this cache (or of the copy) do not change the other."""
        other = copy.copy(self)
        other._k, other._v = list(self._k), list(self._v)
        self._shared = other._shared = True
        return other

    def key_steps(self) -> Tensor:
        """Absolute step number of every cached token, (n_steps * tokens_per_step,)."""
        device = self._k[0].device if self._k else None
        steps = torch.arange(self.first_step, self.first_step + self.n_steps, device=device)
        return steps.repeat_interleave(self.tokens_per_step)

    def token_valid(self) -> Tensor | None:
        """(B, n_steps * tokens_per_step) bool, or None when every cached token is valid."""
        if self.valid is None or self._all_valid:
            return None
        if bool(self.valid.all()):
            self._all_valid = True
            return None
        return self.valid.repeat_interleave(self.tokens_per_step, dim=1)

    # ------------------------------------------------------------------ resets and eviction

    def reset(self, streams: Tensor | None = None) -> None:
        """Forget the history of all streams (None) or of the streams where ``streams`` (B,) is True."""
        if streams is None or self.valid is None:
            self._k, self._v, self.valid = [], [], None
            self._start = self._end = 0
            self.n_steps = self.first_step = 0
            self._shared, self._all_valid = False, True
            return
        if streams.shape != (self.valid.shape[0],) or streams.dtype != torch.bool:
            raise ValueError(f"reset(streams) expects a bool tensor of shape ({self.valid.shape[0]},)")
        self.valid = self.valid & ~streams.to(self.valid.device)[:, None]
        self._all_valid = False
        if not bool(self.valid.any()):
            self.reset()

    def evict(self, keep: int) -> None:
        """Drop the oldest steps so at most ``keep`` remain."""
        drop = self.n_steps - max(keep, 0)
        if drop <= 0:
            return
        if drop == self.n_steps:
            self.reset()
            return
        assert self.valid is not None
        self._start += drop * self.tokens_per_step
        self.valid = self.valid[:, drop:]
        self.n_steps -= drop
        self.first_step += drop

    # ------------------------------------------------------------------ a call that appends steps

    def begin(
        self, n_new_steps: int, tokens_per_step: int, batch_size: int, head_dim: int, device: torch.device
    ) -> StepPlan:
        """Prepare a call that appends ``n_new_steps`` steps: evict what no new step can see, and build
        the rotations and the block-causal (and sliding-window) mask."""
        if self.n_steps and (batch_size != self.batch_size or tokens_per_step != self.tokens_per_step):
            raise ValueError(
                f"KV cache holds {self.batch_size} streams of {self.tokens_per_step} tokens per step; "
                f"got a call with {batch_size} streams of {tokens_per_step} tokens per step"
            )
        if self.max_steps is not None:
            # The first new step sees at most max_steps - 1 older steps.
            self.evict(self.max_steps - 1)
        self.tokens_per_step = tokens_per_step
        n_old = self.n_steps
        old_valid = self.token_valid()
        if n_new_steps == 1 and old_valid is None:
            # One new step, every kept step visible (the eviction above keeps it inside the window).
            rope = rope_at(self.first_step + n_old, tokens_per_step, head_dim, torch.device(device))
            return StepPlan(rope=rope, mask=None, n_old_steps=n_old, n_new_steps=1)
        q_step = torch.arange(n_old, n_old + n_new_steps, device=device).repeat_interleave(tokens_per_step)
        rope = rope_cos_sin(q_step + self.first_step, head_dim)
        k_step = torch.arange(n_old + n_new_steps, device=device).repeat_interleave(tokens_per_step)
        allowed = k_step[None, :] <= q_step[:, None]  # (N_new, M + N_new): causal across steps
        if self.max_steps is not None:
            allowed = allowed & (k_step[None, :] > q_step[:, None] - self.max_steps)
        mask = allowed[None, None]  # (1, 1, N_new, M + N_new)
        if old_valid is not None:
            new_valid = torch.ones(batch_size, n_new_steps * tokens_per_step, dtype=torch.bool, device=device)
            mask = mask & torch.cat([old_valid.to(device), new_valid], dim=1)[:, None, None, :]
        return StepPlan(
            rope=rope,
            mask=None if bool(mask.all()) else mask,
            n_old_steps=n_old,
            n_new_steps=n_new_steps,
        )

    def past(self) -> list[tuple[Tensor, Tensor]] | None:
        """After ``begin``: per layer the kept keys (rotated) / values (B, heads, M, head_dim) the new
        tokens attend to, or None when nothing is kept. For callers that compute the layers themselves
        (an exported graph) and then hand the new tokens to ``extend`` and ``commit`` as usual."""
        if self._start == self._end:
            return None
        return list(zip(self.keys, self.values, strict=True))

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys (rotated) and values (B, heads, N_new, head_dim) after the kept
        tokens; return the keys/values to attend over, kept + new (B, heads, M + N_new, head_dim).
        ``commit`` then makes the new tokens part of the cache."""
        n_new = keys.shape[2]
        if layer == 0:
            self._reserve(keys, n_new)
        if self._start == self._end and len(self._k) <= layer:
            # Empty cache: the new tensors themselves become the buffers (no copy; a training pass
            # stays free of in-place writes). The next call moves them into a real buffer.
            self._k.append(keys)
            self._v.append(values)
            return keys, values
        stop = self._end + n_new
        self._k[layer][:, :, self._end : stop] = keys
        self._v[layer][:, :, self._end : stop] = values
        return self._k[layer][:, :, self._start : stop], self._v[layer][:, :, self._start : stop]

    def commit(self, plan: StepPlan) -> None:
        """Count the new steps written by ``extend`` (every layer), then trim to max_steps."""
        if len(self._k) != self.n_layers:
            raise ValueError(f"expected keys/values for {self.n_layers} layers, got {len(self._k)}")
        batch, device = self._k[0].shape[0], self._k[0].device
        new_valid = torch.ones(batch, plan.n_new_steps, dtype=torch.bool, device=device)
        self.valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=1)
        self._end += plan.n_new_steps * self.tokens_per_step
        self.n_steps += plan.n_new_steps
        if self.max_steps is not None:
            self.evict(self.max_steps)

    def _reserve(self, like: Tensor, n_new: int) -> None:
        """Make room for ``n_new`` tokens after the kept ones in every layer's buffer: move the kept
        tokens into fresh buffers when the current ones are full or shared with a copy."""
        kept = self._end - self._start
        if kept == 0:
            self._k, self._v, self._start, self._end, self._shared = [], [], 0, 0, False
            return
        if not self._shared and self._end + n_new <= self._k[0].shape[2]:
            return
        if self.max_steps is not None:
            capacity = max(kept + n_new, 2 * self.max_steps * self.tokens_per_step)
        else:
            capacity = max(kept + n_new, 2 * kept, _MIN_CAPACITY)
        b, h, _, d = like.shape

        def moved(buffers: list[Tensor]) -> list[Tensor]:
            out = []
            for old in buffers:
                new = like.new_empty(b, h, capacity, d)
                new[:, :, :kept] = old[:, :, self._start : self._end]
                out.append(new)
            return out

        self._k, self._v = moved(self._k), moved(self._v)
        self._start, self._end, self._shared = 0, kept, False


class StepCache(Protocol):
    """What a causal stack needs from a cache for one call that appends steps (``KVCache``,
    ``StackedCache``): ``begin`` -> every layer's ``extend`` -> ``commit``."""

    def begin(
        self, n_new_steps: int, tokens_per_step: int, batch_size: int, head_dim: int, device: torch.device
    ) -> StepPlan: ...

    def past(self) -> list[tuple[Tensor, Tensor]] | None: ...

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]: ...

    def commit(self, plan: StepPlan) -> None: ...


class StackedCache:
    """One batched call over R separate single-stream caches, e.g. a policy server's sessions, which
    tick at their own pace and so cannot share one cache (a ``KVCache`` advances all its streams
    together).

    Every cache keeps its own steps, numbering and window; the call appends the same number of steps
    to each. Row i attends to cache i's kept tokens, right-aligned next to the new tokens and padded
    (masked out) at the front to the longest of them, with RoPE at cache i's own step numbers (per-row
    tables, (R, 1, N_new, head_dim)). Scores depend only on relative steps and padding is masked, so row
    i computes what cache i alone would, up to floating-point summation order.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        if not caches:
            raise ValueError("StackedCache needs at least one cache")
        for cache in caches:
            if cache.batch_size not in (None, 1):
                raise ValueError(f"StackedCache stacks single-stream caches; got one of {cache.batch_size}")
        self.caches = list(caches)
        self._plans: list[StepPlan] = []
        self._kept: list[int] = []  # tokens each cache holds before this call
        self._width = 0  # the longest of them: the padded prefix length

    def begin(
        self, n_new_steps: int, tokens_per_step: int, batch_size: int, head_dim: int, device: torch.device
    ) -> StepPlan:
        if batch_size != len(self.caches):
            raise ValueError(f"a call with {batch_size} streams over {len(self.caches)} stacked caches")
        self._plans = [
            cache.begin(n_new_steps, tokens_per_step, 1, head_dim, device) for cache in self.caches
        ]
        self._kept = [plan.n_old_steps * tokens_per_step for plan in self._plans]
        self._width = width = max(self._kept)
        n_new = n_new_steps * tokens_per_step
        cos = torch.stack([plan.rope[0] for plan in self._plans])  # (R, 1, N_new, hd)
        sin = torch.stack([plan.rope[1] for plan in self._plans])
        mask: Tensor | None = None
        if any(kept != width for kept in self._kept) or any(plan.mask is not None for plan in self._plans):
            mask = torch.zeros(batch_size, 1, n_new, width + n_new, dtype=torch.bool, device=device)
            for row, (plan, kept) in enumerate(zip(self._plans, self._kept, strict=True)):
                if plan.mask is None:
                    mask[row, :, :, width - kept :] = True
                else:
                    mask[row, :, :, width - kept :] = plan.mask[0]
        # Counted in steps like a KVCache's plan: the padded prefix holds width // tokens_per_step of them.
        return StepPlan(
            rope=(cos, sin), mask=mask, n_old_steps=width // tokens_per_step, n_new_steps=n_new_steps
        )

    def past(self) -> list[tuple[Tensor, Tensor]] | None:
        """After ``begin``: per layer every row's kept keys / values, right-aligned and zero-padded at
        the front to the longest (R, heads, width, hd) (the plan's mask hides the padding); None when no
        cache keeps anything."""
        if self._width == 0:
            return None
        kept_caches = [(row, cache) for row, cache in enumerate(self.caches) if self._kept[row]]
        like = kept_caches[0][1].keys[0]
        r, (_, h, _, d) = len(self.caches), like.shape
        out: list[tuple[Tensor, Tensor]] = []
        for layer in range(self.caches[0].n_layers):
            keys = like.new_zeros(r, h, self._width, d)
            values = like.new_zeros(r, h, self._width, d)
            for row, cache in kept_caches:
                kept = self._kept[row]
                keys[row, :, self._width - kept :] = cache.keys[layer][0]
                values[row, :, self._width - kept :] = cache.values[layer][0]
            out.append((keys, values))
        return out

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Hand row i's new keys/values (R, heads, N_new, hd) to cache i; return every row's kept + new
        tokens, padded at the front to the same length (R, heads, width + N_new, hd)."""
        r, h, n_new, d = keys.shape
        keys_all = keys.new_zeros(r, h, self._width + n_new, d)
        values_all = values.new_zeros(r, h, self._width + n_new, d)
        for row, (cache, kept) in enumerate(zip(self.caches, self._kept, strict=True)):
            k, v = cache.extend(layer, keys[row : row + 1], values[row : row + 1])  # (1, h, kept + N_new, hd)
            keys_all[row, :, self._width - kept :] = k[0]
            values_all[row, :, self._width - kept :] = v[0]
        return keys_all, values_all

    def commit(self, plan: StepPlan) -> None:
        for cache, own in zip(self.caches, self._plans, strict=True):
            cache.commit(own)
        self._plans = []
