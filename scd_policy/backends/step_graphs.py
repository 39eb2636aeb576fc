"""SCD's two run-time calls as pure functions of tensors, the form an exporter or a compiler takes.

The torch path drives a ``KVCache`` from inside the encoder's layers (``extend`` per layer) and hands the
decoder Python tuples of modulations. An exported graph cannot call back into Python, so these modules
take everything as tensors and return everything as tensors; the cache stays in Python, unchanged, and
``backends.engine`` feeds it (``StepEngine.encode``). Both wrap the policy's own modules: no weights are
copied, and what they compute is the torch path's arithmetic, op for op.

- ``EncoderStepGraph``: T new steps' tokens plus the cached keys/values of every layer ->
  the new steps' contexts and the new keys (rotated) / values of every layer.
- ``DecoderStepGraph``: one denoising call at one prepared noise level.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_policy.models.decoder import DiffusionDecoder
from scd_policy.models.encoder import CausalEncoder
from scd_policy.models.layers import NoiseLevels, SharedBlockModulation


class EncoderStepGraph(nn.Module):
    """forward(tokens, cos, sin, past_mask, new_mask, k_0, v_0, ..., k_{L-1}, v_{L-1}) ->
    (context, new_k_0, new_v_0, ...).

    - tokens (B, T, S, D): the new steps' tokens (without the query slots, added here);
    - cos, sin (B, 1, N, hd) with N = T * (S + n_ctx): RoPE tables of the new tokens at their steps;
    - past_mask (B, 1, N, M) bool: which cached token each new token may attend to;
      new_mask (B, 1, N, N) bool: the same among the new tokens (block-causal across new steps);
    - k_l, v_l (B, heads, M, hd): layer l's cached keys (rotated) and values. M >= 1: an empty cache is
      fed one zero token that ``past_mask`` hides (exported graphs keep their sizes >= 1).

    Returns context (B, T, n_ctx, D) (after the final norm) and every layer's new keys / values
    (B, heads, N, hd), for the caller to append to its cache.
    """

    def __init__(self, encoder: CausalEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, tokens: Tensor, cos: Tensor, sin: Tensor, past_mask: Tensor, new_mask: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        encoder = self.encoder
        b, t, s, d = tokens.shape
        n_ctx = encoder.n_context_tokens
        slots = encoder.query_slots.expand(b, t, n_ctx, d)
        x = torch.cat([tokens, slots], dim=2).reshape(b, t * (s + n_ctx), d)  # (B, N, D)
        mask = torch.cat([past_mask, new_mask], dim=-1)  # (B, 1, N, M + N)
        new: list[Tensor] = []
        for index, block in enumerate(encoder.blocks):
            prefix = (past[2 * index], past[2 * index + 1])
            x, k, v = block(x, rope=(cos, sin), prefix=prefix, mask=mask)
            new += [k, v]
        context = encoder.norm(x).view(b, t, s + n_ctx, d)[:, :, s:]
        return (context, *new)


class DecoderStepGraph(nn.Module):
    """forward(x_t (N, H, Da), blocks (L, 6, D), final (2, D), context (N, n_ctx, D)) -> (N, H, Da).

    ``blocks`` / ``final`` are one prepared noise level (``decoder.prepare(times)`` at step k:
    ``blocks[k]``, ``final[k]``), shared by every row, exactly what ``decoder(x, prepared.at(k), c)``
    reads."""

    def __init__(self, decoder: DiffusionDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, x_t: Tensor, blocks: Tensor, final: Tensor, context: Tensor) -> Tensor:
        per_block: list[SharedBlockModulation] = []
        for layer in range(blocks.shape[0]):
            w1, b1, g1, w2, b2, g2 = blocks[layer].unbind(0)
            per_block.append((w1, b1, g1, w2, b2, g2))
        weight, shift = final.unbind(0)
        out: Tensor = self.decoder(x_t, NoiseLevels(blocks=tuple(per_block), final=(weight, shift)), context)
        return out


def encoder_input_names(n_layers: int) -> list[str]:
    names = ["tokens", "cos", "sin", "past_mask", "new_mask"]
    for layer in range(n_layers):
        names += [f"past_key_{layer}", f"past_value_{layer}"]
    return names


def encoder_output_names(n_layers: int) -> list[str]:
    names = ["context"]
    for layer in range(n_layers):
        names += [f"new_key_{layer}", f"new_value_{layer}"]
    return names


DECODER_INPUT_NAMES = ["x_t", "blocks", "final", "context"]
DECODER_OUTPUT_NAMES = ["prediction"]
