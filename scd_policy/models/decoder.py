"""Frame-wise diffusion decoder of SCD (DiT style): denoises one step's action chunk given c_t.

The sequence is ``[context tokens ; noisy chunk tokens]`` (token concatenation, the better variant in the
paper's ablation), bidirectional, with no access to other steps and no KV cache, so its cost per
denoising call does not depend on the history length. The noise level enters through AdaLN-Zero
(shared modulation + per-block tables, all zero at init) and the final projection is zero-initialised:
a fresh decoder outputs exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_policy.models.layers import AdaLNDenoiser, NoiseLevels


class DiffusionDecoder(AdaLNDenoiser):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: float,
        dropout: float,
        action_dim: int,
        horizon: int,
        n_context_tokens: int,
        step_conditioning: bool = False,
    ) -> None:
        super().__init__(
            d_model, n_heads, n_layers, mlp_ratio, dropout, action_dim, horizon, step_conditioning
        )
        self.n_context_tokens = n_context_tokens
        self.context_embed = nn.Parameter(torch.randn(n_context_tokens, d_model) * 0.02)

    def forward(self, x_t: Tensor, levels: NoiseLevels, context: Tensor) -> Tensor:
        """x_t (N, H, Da) at noise ``levels`` (``noise_levels(t)`` or ``prepare(times).at(k)``), context
        (N, n_ctx, D) -> prediction (N, H, Da)."""
        x = torch.cat([context + self.context_embed, self.chunk_embed(x_t)], dim=1)  # (N, n_ctx + H, D)
        horizon = x_t.shape[1]
        # The context tokens' outputs of the last block feed nothing (only the chunk is read out), so that
        # block carries the chunk tokens only: (N, H, D) out of it. Exact; 1-4% off a control step on
        # the reference CPU (small preset, K = 10-100), more for one-block decoders.
        last = len(self.blocks) - 1
        for index, (block, mod) in enumerate(zip(self.blocks, levels.blocks, strict=True)):
            x, _, _ = block(x, mod, queries=horizon if index == last else None)
        out: Tensor = self.final(x, levels.final)
        return out
