"""Non-causal diffusion transformer over a fixed observation window: the ``diffusion_policy`` baseline.

Tokens of the last ``n_obs_steps`` observations and the noisy chunk form one bidirectional sequence that
is re-run through all layers at every denoising call (Chi et al. 2023, transformer variant). The noise
level conditions every token through AdaLN-Zero, as in the other policies' denoisers; RoPE numbers the
observation tokens by step and puts the chunk at the current step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_policy.models.layers import (
    AdaLNBlock,
    ChunkEmbedding,
    FinalLayer,
    Modulation,
    TimestepEmbedding,
    rope_cos_sin,
)


class WindowedDiffusionTransformer(nn.Module):
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
        super().__init__()
        self.head_dim = d_model // n_heads
        self.chunk_embed = ChunkEmbedding(action_dim, horizon, d_model)
        self.time_embed = TimestepEmbedding(d_model)
        self.modulation = Modulation(d_model)
        self.blocks = nn.ModuleList(AdaLNBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.final = FinalLayer(d_model, action_dim)

    def forward(self, x_t: Tensor, t: Tensor, obs_tokens: Tensor) -> Tensor:
        """x_t (N, H, Da), t (N,), obs_tokens (N, n_obs, S, D) -> prediction (N, H, Da)."""
        n, n_obs, s, d = obs_tokens.shape
        h = x_t.shape[1]
        cond = self.time_embed(t)  # (N, D)
        mod = self.modulation(cond).unsqueeze(1)  # (N, 1, 6, D)
        x = torch.cat([obs_tokens.reshape(n, n_obs * s, d), self.chunk_embed(x_t)], dim=1)
        positions = torch.cat(
            [
                torch.arange(n_obs, device=x.device).repeat_interleave(s),
                torch.full((h,), n_obs - 1, device=x.device),
            ]
        )
        rope = rope_cos_sin(positions, self.head_dim)
        for block in self.blocks:
            x, _, _ = block(x, mod, rope=rope)
        out: Tensor = self.final(x[:, n_obs * s :], cond)
        return out
