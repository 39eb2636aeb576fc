"""KV cache over control steps for block-causal transformers.

A cache serves B streams (environments) that advance together: every call appends the same number of
steps to every stream, so all streams share one length (``n_steps``). A stream can still be restarted
on its own: ``reset(streams)`` marks that stream's cached steps invalid, and attention masks them out,
which is exactly equivalent to the stream having no history (softmax over the remaining keys, and RoPE
scores depend only on relative positions). A runtime that would rather not carry masked steps keeps
one cache per environment (B = 1).

Sliding window (``max_steps`` = N). Every layer of a step attends to the last N steps (its own
included): sliding-window attention, as in Mistral. Keys are stored *unrotated*; each call renumbers the
retained steps 0..n_steps-1 and rotates their keys on the fly, so positions never grow with the episode
and the scores a step sees depend only on step differences. Consequences, all tested:

- stepping one step at a time with eviction equals one pass over the *whole* history with the
  N-step window mask (``begin`` builds that mask for multi-step calls too), so a streaming runtime and
  ``predict_chunk`` on the full history agree exactly, and memory stays flat;
- for a single layer this also equals a fresh pass over the last N steps only. With more layers it does
  not: the retained steps' deeper keys/values were computed while older steps were still visible, so
  information from up to L * N steps back can reach the newest step (the receptive field of any
  sliding-window transformer). Exact "fresh pass over the last N steps" would mean re-encoding N steps
  per control step, which is what the cache exists to avoid.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from scd_policy.models.layers import apply_rope, rope_cos_sin


@dataclass(frozen=True)
class StepPlan:
    """What the layers of one call need: rotations for the new and the cached tokens, and the mask."""

    rope: tuple[Tensor, Tensor]  # for the new tokens, (1, N_new, head_dim)
    prefix_rope: tuple[Tensor, Tensor] | None  # for the cached tokens, (1, M, head_dim)
    mask: Tensor | None  # bool (B, 1, N_new, M + N_new); None when every key is visible to every query
    n_old_steps: int
    n_new_steps: int


class KVCache:
    """Per-layer keys/values (B, heads, n_steps * tokens_per_step, head_dim) of the last steps."""

    def __init__(self, n_layers: int, max_steps: int | None = None) -> None:
        if n_layers < 1:
            raise ValueError(f"a KV cache needs at least one layer, got n_layers={n_layers}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for unbounded), got {max_steps}")
        self.n_layers = n_layers
        self.max_steps = max_steps
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.valid: Tensor | None = None  # (B, n_steps) bool: False for steps of a reset stream
        self.n_steps = 0
        self.tokens_per_step = 0

    @property
    def batch_size(self) -> int | None:
        return None if self.valid is None else int(self.valid.shape[0])

    def copy(self) -> KVCache:
        """A snapshot: later appends/evictions of this cache do not change it (tensors are shared, never
        written in place)."""
        other = copy.copy(self)
        other.keys, other.values = list(self.keys), list(self.values)
        return other

    def reset(self, streams: Tensor | None = None) -> None:
        """Forget the history of all streams (None) or of the streams where ``streams`` (B,) is True."""
        if streams is None or self.valid is None:
            self.keys, self.values, self.valid = [], [], None
            self.n_steps = 0
            return
        if streams.shape != (self.valid.shape[0],) or streams.dtype != torch.bool:
            raise ValueError(f"reset(streams) expects a bool tensor of shape ({self.valid.shape[0]},)")
        self.valid = self.valid & ~streams.to(self.valid.device)[:, None]
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
        start = drop * self.tokens_per_step
        self.keys = [k[:, :, start:] for k in self.keys]
        self.values = [v[:, :, start:] for v in self.values]
        assert self.valid is not None
        self.valid = self.valid[:, drop:]
        self.n_steps -= drop

    def key_steps(self) -> Tensor:
        """Step number (0 = oldest kept) of every cached token, (n_steps * tokens_per_step,)."""
        device = self.keys[0].device if self.keys else None
        return torch.arange(self.n_steps, device=device).repeat_interleave(self.tokens_per_step)

    def token_valid(self) -> Tensor | None:
        """(B, n_steps * tokens_per_step) bool, or None when every cached token is valid."""
        if self.valid is None or bool(self.valid.all()):
            return None
        return self.valid.repeat_interleave(self.tokens_per_step, dim=1)

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
        q_step = torch.arange(n_old, n_old + n_new_steps, device=device).repeat_interleave(tokens_per_step)
        k_step = torch.arange(n_old + n_new_steps, device=device).repeat_interleave(tokens_per_step)
        allowed = k_step[None, :] <= q_step[:, None]  # (N_new, M + N_new): causal across steps
        if self.max_steps is not None:
            allowed = allowed & (k_step[None, :] > q_step[:, None] - self.max_steps)
        mask = allowed[None, None]  # (1, 1, N_new, M + N_new)
        old_valid = self.token_valid()
        if old_valid is not None:
            new_valid = torch.ones(batch_size, n_new_steps * tokens_per_step, dtype=torch.bool, device=device)
            mask = mask & torch.cat([old_valid.to(device), new_valid], dim=1)[:, None, None, :]
        rope = rope_cos_sin(q_step, head_dim)
        prefix_rope = rope_cos_sin(k_step[: n_old * tokens_per_step], head_dim) if n_old else None
        return StepPlan(
            rope=rope,
            prefix_rope=prefix_rope,
            mask=None if bool(mask.all()) else mask,
            n_old_steps=n_old,
            n_new_steps=n_new_steps,
        )

    def prefix(self, layer: int, plan: StepPlan) -> tuple[Tensor, Tensor] | None:
        """Cached keys (rotated to this call's step numbers) and values of one layer, or None if empty."""
        if plan.n_old_steps == 0:
            return None
        assert plan.prefix_rope is not None
        return apply_rope(self.keys[layer], *plan.prefix_rope), self.values[layer]

    def rotated_keys(self, layer: int) -> Tensor:
        """Cached keys of one layer rotated to step numbers 0..n_steps-1, (B, heads, M, head_dim)."""
        k = self.keys[layer]
        return apply_rope(k, *rope_cos_sin(self.key_steps(), k.shape[-1]))

    def append(self, keys: list[Tensor], values: list[Tensor], plan: StepPlan) -> None:
        """Store the new steps' per-layer keys/values (B, heads, N_new, head_dim), then trim to max_steps."""
        if len(keys) != self.n_layers or len(values) != self.n_layers:
            raise ValueError(
                f"expected keys/values for {self.n_layers} layers, got {len(keys)}/{len(values)}"
            )
        batch, device = keys[0].shape[0], keys[0].device
        new_valid = torch.ones(batch, plan.n_new_steps, dtype=torch.bool, device=device)
        if self.n_steps == 0:
            self.keys, self.values, self.valid = list(keys), list(values), new_valid
        else:
            assert self.valid is not None
            self.keys = [torch.cat([old, new], dim=2) for old, new in zip(self.keys, keys, strict=True)]
            self.values = [torch.cat([old, new], dim=2) for old, new in zip(self.values, values, strict=True)]
            self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.n_steps += plan.n_new_steps
        if self.max_steps is not None:
            self.evict(self.max_steps)
