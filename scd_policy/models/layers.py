"""Transformer building blocks shared by every policy network.

- ``rope_cos_sin`` / ``apply_rope``: rotary position embedding (rotate-half form). Attention scores then
  depend only on the *difference* of two positions, which is what makes a sliding KV-cache window exact.
- ``Attention``: multi-head self-attention over ``F.scaled_dot_product_attention`` that can prepend a
  prefix of cached keys/values, or hand its (rotated) keys/values to a cache that returns what to attend
  over (``extend``, see ``KVCache.extend``).
- ``Block``: pre-norm transformer block (the causal encoder).
- ``AdaLNBlock``: DiT-style block whose norms are modulated by the noise level (AdaLN-Zero). The
  modulation network is shared by all blocks of a stack (``Modulation``, the "adaLN-single" variant of
  PixArt-alpha) and each block adds its own learned table; everything starts at zero, so every block
  starts as the identity. Sharing keeps a block at the size of a plain block (a per-block
  D -> 6D modulation MLP would add 50% to each block and make the monolithic baseline a third larger
  than SCD at equal depth, breaking the equal-size comparison).
- ``TimestepEmbedding``: sinusoidal features of the noise level followed by an MLP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Called with a layer's new keys (rotated) and values (B, heads, N, hd); returns the keys/values to attend
# over (cached + new), e.g. ``functools.partial(cache.extend, layer)``.
KVExtend = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

ROPE_BASE = 10_000.0


def rope_cos_sin(positions: Tensor, head_dim: int, base: float = ROPE_BASE) -> tuple[Tensor, Tensor]:
    """Rotation tables for ``positions`` of shape (N,) or (G, N).

    Returns cos and sin of shape (1, N, head_dim) or (G, 1, N, head_dim), broadcastable against
    (B, heads, N, head_dim) tensors.
    """
    half = head_dim // 2
    # float64 angles: positions are absolute step numbers (KV cache), exact however long an episode is.
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., N, half)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(-3)  # (..., 1, N, head_dim)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


# rope_cos_sin rows of positions 0 .. N-1 per (head_dim, device), grown by doubling up to a bound: the
# tables of one streamed step are then a lookup, not a dozen small tensor ops.
_ROPE_ROWS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}
_ROPE_ROWS_MAX = 1 << 16


def rope_at(position: int, n_tokens: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``rope_cos_sin`` of ``n_tokens`` tokens that all sit at ``position`` (one control step's),
    (1, n_tokens, head_dim) each (expanded views of one row)."""
    rows = _ROPE_ROWS.get((head_dim, device))
    if rows is None or position >= rows[0].shape[0]:
        if position >= _ROPE_ROWS_MAX:
            return rope_cos_sin(torch.full((n_tokens,), position, device=device), head_dim)
        size = min(max(256, 2 * (position + 1)), _ROPE_ROWS_MAX)
        with torch.inference_mode(False):  # a plain tensor: callers with autograd may read it too
            cos, sin = rope_cos_sin(torch.arange(size, device=device), head_dim)  # (1, size, head_dim)
        rows = _ROPE_ROWS[(head_dim, device)] = (cos[0], sin[0])
    cos, sin = rows
    return cos[position].expand(1, n_tokens, head_dim), sin[position].expand(1, n_tokens, head_dim)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, heads, N, head_dim) by the given angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: x (B, N, D) with shift/scale (B or 1, N or 1, D)."""
    return x * (1 + scale) + shift


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        if self.training and self.dropout.p > 0:  # skip a no-op module call at inference
            out = self.dropout(out)
        return out


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE and an optional prefix of cached keys/values."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        prefix: tuple[Tensor, Tensor] | None = None,
        extend: KVExtend | None = None,
        mask: Tensor | None = None,
        queries: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, D) -> (out (B, Q, D), the new tokens' keys (B, h, N, hd) rotated, values).

        rope: cos/sin for the N new tokens (see ``rope_cos_sin``); applied to q and the new k.
        prefix: keys (already rotated to their positions) and values (B, h, M, hd) placed before the
        new tokens (not stored anywhere). extend: a cache's writer instead (see ``KVExtend``), which
        stores the new keys/values and returns cached + new. mask: bool (B or 1, 1, N, M + N), True
        where a query may attend to a key. queries: only the last Q tokens attend (their outputs are
        returned); every token still serves as a key/value. None: Q = N.
        """
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if queries is not None and queries < n:
            q = q[:, :, n - queries :]
            mask = None if mask is None else mask[..., n - queries :, :]
            n = queries
        if extend is not None:
            k_all, v_all = extend(k, v)
        elif prefix is not None:
            k_all, v_all = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        else:
            k_all, v_all = k, v
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), k, v


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, int(d_model * mlp_ratio), dropout)

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        prefix: tuple[Tensor, Tensor] | None = None,
        extend: KVExtend | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # x: (B, N, D) -> (B, N, D), plus this layer's new keys (rotated) / values; ``extend`` caches them
        h, k, v = self.attn(self.norm1(x), rope=rope, prefix=prefix, extend=extend, mask=mask)
        x = x + h
        return x + self.mlp(self.norm2(x)), k, v


N_MODULATIONS = 6  # shift/scale/gate for attention, shift/scale/gate for the MLP


class Modulation(nn.Module):
    """Shared AdaLN modulation: condition (..., D) -> (..., 6, D); zero-initialised (identity blocks)."""

    def __init__(self, d_model: int, n_outputs: int = N_MODULATIONS) -> None:
        super().__init__()
        self.n_outputs = n_outputs
        self.linear = nn.Linear(d_model, n_outputs * d_model)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cond: Tensor) -> Tensor:
        out: Tensor = self.linear(F.silu(cond))
        return out.view(*cond.shape[:-1], self.n_outputs, cond.shape[-1])


# One block's modulation at one denoising step, shared by every row of the batch (at sampling time every
# row is at the same noise level): (1 + scale1, shift1, gate1, 1 + scale2, shift2, gate2), each (D,).
SharedBlockModulation = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class AdaLNBlock(nn.Module):
    """DiT block with AdaLN-Zero: norms without affine parameters, modulated by the noise level.

    ``mod`` (B or 1, N or 1, 6, D) comes from the stack's shared ``Modulation``; this block adds its own
    table (zero at init), so with both at zero the gates are 0 and the block is the identity.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d_model, int(d_model * mlp_ratio), dropout)
        self.mod_table = nn.Parameter(torch.zeros(N_MODULATIONS, d_model))

    def forward(
        self,
        x: Tensor,
        mod: Tensor | SharedBlockModulation,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        prefix: tuple[Tensor, Tensor] | None = None,
        extend: KVExtend | None = None,
        mask: Tensor | None = None,
        queries: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # x: (B, N, D), mod: (B|1, N|1, 6, D) or this block's SharedBlockModulation (from
        # ``shared_modulations``) -> (B, Q, D), plus new keys (rotated) / values (B, h, N, hd).
        # queries=Q: only the last Q tokens are carried on (a stack's last block, when the tokens before
        # them feed nothing after it); the others still serve as keys/values. None: Q = N.
        rest = x if queries is None else x[:, x.shape[1] - queries :]
        if isinstance(mod, tuple):
            # The modulation folds into layer_norm's affine parameters: one op instead of four.
            d = x.shape[-1]
            weight1, shift1, gate1, weight2, shift2, gate2 = mod
            h, k, v = self.attn(
                F.layer_norm(x, (d,), weight1, shift1, self.norm1.eps),
                rope=rope,
                prefix=prefix,
                extend=extend,
                mask=mask,
                queries=queries,
            )
            x = torch.addcmul(rest, gate1, h)
            x = torch.addcmul(x, gate2, self.mlp(F.layer_norm(x, (d,), weight2, shift2, self.norm2.eps)))
            return x, k, v
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.mod_table).unbind(dim=-2)
        h, k, v = self.attn(
            modulate(self.norm1(x), shift1, scale1),
            rope=rope,
            prefix=prefix,
            extend=extend,
            mask=mask,
            queries=queries,
        )
        if queries is not None and shift2.shape[-2] > 1:  # per-token modulation: the carried tokens' rows
            shift2, scale2, gate1, gate2 = (m[..., -queries:, :] for m in (shift2, scale2, gate1, gate2))
        x = rest + gate1 * h
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, k, v


class FinalLayer(nn.Module):
    """AdaLN-modulated norm and a zero-initialised projection: a fresh network outputs exactly 0."""

    def __init__(self, d_model: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(d_model, n_outputs=2)
        self.linear = nn.Linear(d_model, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        # x: (B, N, D), cond: (B, D), or (1 + scale, shift) each (D,) shared by the batch -> (B, N, out_dim)
        if isinstance(cond, tuple):
            out: Tensor = self.linear(F.layer_norm(x, (x.shape[-1],), cond[0], cond[1], self.norm.eps))
            return out
        shift, scale = self.modulation(cond).unsqueeze(1).unbind(dim=-2)
        out = self.linear(modulate(self.norm(x), shift, scale))
        return out


@dataclass(frozen=True)
class SharedModulations:
    """Everything the AdaLN blocks and final layer of one stack need at each of K denoising steps,
    computed in one batched pass over the K noise levels (see ``shared_modulations``)."""

    blocks: Tensor  # (K, L, 6, D): per step and block (1 + scale1, shift1, gate1, 1 + scale2, shift2, gate2)
    final: Tensor  # (K, 2, D): (1 + scale, shift) of the final layer

    def block(self, step: int, layer: int) -> SharedBlockModulation:
        w1, b1, g1, w2, b2, g2 = self.blocks[step, layer].unbind(0)
        return (w1, b1, g1, w2, b2, g2)

    def final_layer(self, step: int) -> tuple[Tensor, Tensor]:
        weight, shift = self.final[step].unbind(0)
        return weight, shift

    def at(self, step: int) -> NoiseLevels:
        """The conditioning of the ``step``-th prepared noise level, shared by every row."""
        return NoiseLevels(
            blocks=tuple(self.block(step, layer) for layer in range(self.blocks.shape[1])),
            final=self.final_layer(step),
        )


@dataclass(frozen=True)
class NoiseLevels:
    """What a denoiser stack's AdaLN blocks and final layer read about the noise level: the one input
    through which every denoiser call is conditioned.

    Per row (``AdaLNDenoiser.noise_levels(t)``, training: every sample at its own t), or one prepared
    sampling step shared by all rows (``SharedModulations.at(k)``: computed once per sampling run and
    folded into layer_norm's affine parameters).
    """

    blocks: tuple[Tensor | SharedBlockModulation, ...]  # per block: (N, 1, 6, D) or the shared tuple
    final: Tensor | tuple[Tensor, Tensor]  # (N, D) time embedding, or (1 + scale, shift)


def shared_modulations(
    cond: Tensor,
    modulation: Modulation,
    blocks: Iterable[nn.Module],
    final: FinalLayer,
) -> SharedModulations:
    """The AdaLN parameters of a stack for K noise-level conditions ``cond`` (K, D) (the embedded
    sampling times), for batches whose rows share a noise level (sampling): what each denoising call
    would otherwise recompute from t every time."""
    table = torch.stack([cast(AdaLNBlock, block).mod_table for block in blocks])  # (L, 6, D)
    mod = modulation(cond)[:, None] + table  # (K, L, 6, D): shift1, scale1, gate1, shift2, scale2, gate2
    ones = torch.zeros_like(mod)
    ones[:, :, 1] = 1.0
    ones[:, :, 4] = 1.0
    # Reorder to (1 + scale1, shift1, gate1, 1 + scale2, shift2, gate2).
    per_block = (mod + ones)[:, :, [1, 0, 2, 4, 3, 5]]
    final_shift, final_scale = final.modulation(cond).unbind(dim=-2)  # (K, D) each
    return SharedModulations(blocks=per_block, final=torch.stack([1 + final_scale, final_shift], dim=1))


class TimestepEmbedding(nn.Module):
    """Noise level t in [0, 1] (B,) -> (B, D): sinusoidal features of 1000 t, then an MLP."""

    def __init__(self, d_model: int, n_frequencies: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        half = n_frequencies // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    freqs: Tensor

    def forward(self, t: Tensor) -> Tensor:
        # Scaled by 1000 so a [0, 1] time spans the frequencies the way a 1000-step index would.
        args = (1000.0 * t.to(torch.float32))[:, None] * self.freqs[None]  # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        out: Tensor = self.mlp(emb.to(self.freqs.dtype))
        return out


class ChunkEmbedding(nn.Module):
    """Noisy action chunk (B, H, Da) -> tokens (B, H, D): a linear map plus a learned position per slot."""

    def __init__(self, action_dim: int, horizon: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(action_dim, d_model)
        self.pos_embed = nn.Parameter(torch.randn(horizon, d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(x) + self.pos_embed
        return out


class AdaLNDenoiser(nn.Module):
    """The parts every denoiser here shares: the noisy chunk's embedding, the noise-level embedding with
    its shared modulation, a stack of AdaLN-Zero blocks and the zero-initialised output layer.

    SCD's decoder, the monolithic causal baseline and the windowed baseline differ only in what else
    joins the chunk tokens in attention (context tokens, cached history, an observation window).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: float,
        dropout: float,
        action_dim: int,
        horizon: int,
        step_conditioning: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.chunk_embed = ChunkEmbedding(action_dim, horizon, d_model)
        self.time_embed = TimestepEmbedding(d_model)
        self.modulation = Modulation(d_model)
        self.blocks = nn.ModuleList(AdaLNBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.final = FinalLayer(d_model, action_dim)
        # Few-step (shortcut) denoisers are also told the size of the step they are asked to take
        # (diffusion.shortcut): its embedding is added to the time's, and starts at zero, so a denoiser
        # fine-tuned from a plain one starts out as that one.
        self.step_embed: TimestepEmbedding | None = None
        if step_conditioning:
            self.step_embed = TimestepEmbedding(d_model)
            last = cast(nn.Linear, self.step_embed.mlp[-1])
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def condition(self, t: Tensor, step: Tensor | None = None) -> Tensor:
        """The noise-level embedding (N, D) of network times t (N,) and, for a step-conditioned denoiser,
        step sizes ``step`` (N,) (None: 0, the instantaneous velocity of plain flow matching)."""
        cond: Tensor = self.time_embed(t)
        if self.step_embed is not None:
            cond = cond + self.step_embed(torch.zeros_like(t) if step is None else step)
        return cond

    def prepare(self, times: Tensor, step_size: float | None = None) -> SharedModulations:
        """The modulation of every block at the K sampling times (K,) (and the step size of a
        step-conditioned denoiser): ``prepare(times).at(k)`` is the conditioning of the k-th denoising
        call of a sampling run."""
        steps = None if step_size is None else torch.full_like(times, step_size)
        return shared_modulations(self.condition(times, steps), self.modulation, self.blocks, self.final)

    def noise_levels(self, t: Tensor, step: Tensor | None = None) -> NoiseLevels:
        """The conditioning of rows at their own network times t (N,) in [0, 1] (training), and their
        own step sizes ``step`` (N,) for a step-conditioned denoiser."""
        cond = self.condition(t, step)  # (N, D)
        mod = self.modulation(cond).unsqueeze(1)  # (N, 1, 6, D): the same for every token of a row
        return NoiseLevels(blocks=(mod,) * len(self.blocks), final=cond)
