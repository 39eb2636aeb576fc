"""Causal encoder of SCD: a block-causal transformer over control steps, run once per step.

Every step contributes its tokens plus ``n_context_tokens`` learned query slots. Attention is
bidirectional inside a step and causal across steps; RoPE numbers tokens by their *step* (all tokens of a
step share one position), so only step differences enter the scores. The outputs of step t's query slots,
after a final norm, are the context ``c_t`` handed to the diffusion decoder.

``forward(tokens, cache)`` is the one entry point: with no cache it is the teacher-forced pass over a
training window; with a ``KVCache`` it appends the new steps (one step per control step at run time, or a
whole history when priming) and returns their contexts, identical to a full pass over the cached steps.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from scd_policy.models.kv_cache import KVCache, StepCache
from scd_policy.models.layers import Block


class CausalEncoder(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: float,
        dropout: float,
        n_context_tokens: int,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.n_context_tokens = n_context_tokens
        self.query_slots = nn.Parameter(torch.randn(n_context_tokens, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def new_cache(self, max_steps: int | None) -> KVCache:
        return KVCache(len(self.blocks), max_steps)

    def forward(
        self, tokens: Tensor, cache: StepCache | None = None, history_span: Tensor | None = None
    ) -> Tensor:
        """tokens (B, T, S, D) of T new steps -> contexts (B, T, n_context_tokens, D).

        With a cache the new steps attend to its (valid, retained) steps and are then appended to it.
        ``history_span`` (B, T) long, a training window only (no cache): at every layer step i attends
        to steps i - span[b, i] .. i alone (random history lengths; through L layers step i can still
        read up to L x span steps back, as a sliding run-time window lets deeper layers do).
        """
        b, t, s, d = tokens.shape
        slots = self.query_slots.expand(b, t, self.n_context_tokens, d)
        x = torch.cat([tokens, slots], dim=2)  # (B, T, S + n_ctx, D)
        per_step = s + self.n_context_tokens
        x = x.reshape(b, t * per_step, d)
        if history_span is not None and cache is not None:
            raise ValueError("history_span shapes a teacher-forced window; a call with a cache has none")
        cache = cache if cache is not None else self.new_cache(None)
        plan = cache.begin(t, per_step, b, self.head_dim, x.device)
        mask = plan.mask if history_span is None else _span_mask(plan.mask, history_span, per_step)
        for index, block in enumerate(self.blocks):
            x, _, _ = block(x, rope=plan.rope, extend=partial(cache.extend, index), mask=mask)
        cache.commit(plan)
        out: Tensor = self.norm(x).view(b, t, per_step, d)
        return out[:, :, s:]  # the query slots' outputs


def _span_mask(causal: Tensor | None, span: Tensor, per_step: int) -> Tensor:
    """The block-causal mask of a window (1, 1, N, N) narrowed so that query step i sees key steps
    i - span[b, i] .. i only -> (B, 1, N, N), N = T * per_step."""
    t = span.shape[1]
    step = torch.arange(t, device=span.device)
    visible = (step[None, None, :] >= (step - span)[:, :, None]) & (
        step[None, None, :] <= step[None, :, None]
    )
    tokens = visible.repeat_interleave(per_step, 1).repeat_interleave(per_step, 2)  # (B, N, N)
    mask = tokens[:, None]
    return mask if causal is None else mask & causal
