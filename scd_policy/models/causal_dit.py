"""Monolithic causal diffusion transformer: the ``causal_diffusion`` baseline (the paper's "Causal DiT").

One stack of AdaLN-Zero blocks (depth encoder_layers + decoder_layers) over two kinds of tokens:

- history step tokens (clean observations + previous action), block-causal across steps with RoPE by
  step, conditioned on a learned "clean" vector instead of a noise level, so their keys/values never
  depend on the chunk being denoised and are KV-cached: ``encode(tokens, cache)`` appends steps;
- noisy chunk tokens of step t, which pass through *all* layers at *every* denoising call and attend to
  the cached history steps <= t and to each other (``denoise``). They are never cached.

Per control step this costs L layer calls for the new step plus K * L for the chunk, against SCD's
L_enc + K * L_dec. In training, ``denoise`` runs the chunks of every step of a window (and R noise draws)
in one call, each attending to its own prefix of the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from scd_policy.models.kv_cache import KVCache
from scd_policy.models.layers import AdaLNDenoiser, NoiseLevels, rope_cos_sin


@dataclass(frozen=True)
class History:
    """An immutable view of a cache prepared for denoising (views of the cache's buffers, which later
    steps never write over; see ``scd_policy.models.kv_cache``)."""

    keys: tuple[Tensor, ...]  # per layer (B, heads, M, head_dim), rotated to their absolute steps
    values: tuple[Tensor, ...]
    key_steps: Tensor  # (M,) absolute step number of each cached token
    token_valid: Tensor | None  # (B, M) bool, None when all valid
    n_steps: int
    first_step: int = 0  # absolute step number of the oldest cached step

    @property
    def last_step(self) -> int:
        """Absolute step number of the newest cached step (where its chunk's tokens are placed)."""
        return self.first_step + self.n_steps - 1

    def select(self, rows: Tensor) -> History:
        """The history of the streams ``rows`` (R,) only (step numbering is shared by all streams)."""
        return History(
            keys=tuple(k[rows] for k in self.keys),
            values=tuple(v[rows] for v in self.values),
            key_steps=self.key_steps,
            token_valid=None if self.token_valid is None else self.token_valid[rows],
            n_steps=self.n_steps,
            first_step=self.first_step,
        )

    @classmethod
    def from_cache(cls, cache: KVCache) -> History:
        if cache.n_steps == 0:
            raise ValueError("the history is empty: encode at least one step before denoising")
        return cls(
            keys=tuple(cache.keys),
            values=tuple(cache.values),
            key_steps=cache.key_steps(),
            token_valid=cache.token_valid(),
            n_steps=cache.n_steps,
            first_step=cache.first_step,
        )


class CausalDiffusionTransformer(AdaLNDenoiser):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: float,
        dropout: float,
        action_dim: int,
        horizon: int,
    ) -> None:
        super().__init__(d_model, n_heads, n_layers, mlp_ratio, dropout, action_dim, horizon)
        self.history_cond = nn.Parameter(torch.randn(d_model) * 0.02)  # "clean" condition of history tokens

    def new_cache(self, max_steps: int | None) -> KVCache:
        return KVCache(len(self.blocks), max_steps)

    def encode(self, tokens: Tensor, cache: KVCache) -> None:
        """Append T history steps' tokens (B, T, S, D) to the cache, through every layer."""
        b, t, s, d = tokens.shape
        mod = self.modulation(self.history_cond).view(1, 1, -1, d)  # (1, 1, 6, D)
        x = tokens.reshape(b, t * s, d)
        plan = cache.begin(t, s, b, self.head_dim, x.device)
        for index, block in enumerate(self.blocks):
            # The last layer's history outputs feed nothing, but computing them keeps one code path
            # and costs little next to the K chunk passes.
            x, _, _ = block(x, mod, rope=plan.rope, extend=partial(cache.extend, index), mask=plan.mask)
        cache.commit(plan)

    def denoise(self, x_t: Tensor, t: Tensor, history: History, step: Tensor) -> Tensor:
        """Chunks x_t (B, G, H, Da) at noise levels t (B, G); chunk g of stream b belongs to history step
        ``step[g]`` (G,) (absolute step numbers, see ``History.key_steps``) and sees that stream's cached
        steps <= step[g]. Returns (B, G, H, Da)."""
        b, g, h, _ = x_t.shape
        return self.denoise_with(
            x_t, self.noise_levels(t.reshape(b * g)), self.attention_inputs(history, step, b, h)
        )

    def denoise_with(self, x_t: Tensor, levels: NoiseLevels, attend: AttentionInputs) -> Tensor:
        """The one denoiser path: chunks x_t (B, G, H, Da) at noise ``levels`` (per row, or a prepared
        sampling step ``prepare(times).at(k)``), with the history's attention inputs (prepared once per
        sampling run by ``attention_inputs``). Returns (B, G, H, Da)."""
        b, g, h, _ = x_t.shape
        x = self.chunk_embed(x_t.reshape(b * g, h, -1))  # (B*G, H, D)
        for block, mod, prefix in zip(self.blocks, levels.blocks, attend.prefixes, strict=True):
            x, _, _ = block(x, mod, rope=attend.rope, prefix=prefix, mask=attend.mask)
        out: Tensor = self.final(x, levels.final)
        return out.view(b, g, h, -1)

    def attention_inputs(self, history: History, step: Tensor, b: int, h: int) -> AttentionInputs:
        """What the chunk tokens' attention needs and what does not change over the denoising steps:
        RoPE tables at their step, the mask over history + own tokens, per-layer history keys/values."""
        g = step.shape[0]
        # Chunk tokens sit at their step's position: relative position 0 to that step's observations.
        cos, sin = rope_cos_sin(step[:, None].expand(g, h), self.head_dim)  # (G, 1, H, hd)
        rope = (cos.repeat(b, 1, 1, 1), sin.repeat(b, 1, 1, 1))  # (B*G, 1, H, hd), b-major like x
        visible = history.key_steps[None, :] <= step[:, None]  # (G, M)
        hist_mask = visible[None].expand(b, g, -1)  # (B, G, M)
        if history.token_valid is not None:
            hist_mask = hist_mask & history.token_valid[:, None, :]
        mask: Tensor | None = None
        if not bool(hist_mask.all()):
            own = torch.ones(b, g, h, dtype=torch.bool, device=step.device)
            mask = torch.cat([hist_mask, own], dim=2).reshape(b * g, 1, 1, -1)
        m = history.key_steps.shape[0]
        prefixes = []
        for index in range(len(self.blocks)):
            # Every chunk group reads its stream's history keys/values: (B, h, M, hd) -> (B*G, h, M, hd).
            keys = history.keys[index][:, None].expand(b, g, self.n_heads, m, self.head_dim)
            values = history.values[index][:, None].expand(b, g, self.n_heads, m, self.head_dim)
            prefixes.append(
                (
                    keys.reshape(b * g, self.n_heads, m, self.head_dim),
                    values.reshape(b * g, self.n_heads, m, self.head_dim),
                )
            )
        return AttentionInputs(rope=rope, mask=mask, prefixes=tuple(prefixes))


@dataclass(frozen=True)
class AttentionInputs:
    """The chunk tokens' attention inputs for one history (constant over a sampling run)."""

    rope: tuple[Tensor, Tensor]  # (B*G, 1, H, hd)
    mask: Tensor | None  # (B*G, 1, 1, M + H) bool, None when everything is visible
    prefixes: tuple[tuple[Tensor, Tensor], ...]  # per layer history keys/values (B*G, h, M, hd)
