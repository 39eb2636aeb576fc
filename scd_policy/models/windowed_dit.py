"""Non-causal diffusion transformer over a fixed observation window: the ``diffusion_policy`` baseline.

Tokens of the last ``n_obs_steps`` observations and the noisy chunk form one bidirectional sequence that
is re-run through all layers at every denoising call (Chi et al. 2023, transformer variant). The noise
level conditions every token through AdaLN-Zero, as in the other policies' denoisers; RoPE numbers the
observation tokens by step and puts the chunk at the current step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scd_policy.models.layers import (
    AdaLNDenoiser,
    SharedModulations,
    rope_cos_sin,
)


class WindowedDiffusionTransformer(AdaLNDenoiser):
    def positions(self, n_obs: int, s: int, h: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE tables: observation tokens by step, the chunk at the current (last) step."""
        positions = torch.cat(
            [
                torch.arange(n_obs, device=device).repeat_interleave(s),
                torch.full((h,), n_obs - 1, device=device),
            ]
        )
        return rope_cos_sin(positions, self.head_dim)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | None,
        obs_tokens: Tensor,
        shared: SharedModulations | None = None,
        step: int = 0,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x_t (N, H, Da), t (N,), obs_tokens (N, n_obs, S, D) -> prediction (N, H, Da).

        With ``shared`` (from ``prepare``) every row is at the ``step``-th prepared noise level and
        ``t`` is not read; ``rope`` (from ``positions``) may be passed to skip rebuilding it."""
        n, n_obs, s, d = obs_tokens.shape
        h = x_t.shape[1]
        x = torch.cat([obs_tokens.reshape(n, n_obs * s, d), self.chunk_embed(x_t)], dim=1)
        rope = rope if rope is not None else self.positions(n_obs, s, h, x.device)
        if shared is not None:
            for index, block in enumerate(self.blocks):
                x, _, _ = block(x, shared.block(step, index), rope=rope)
            out: Tensor = self.final(x[:, n_obs * s :], shared.final_layer(step))
            return out
        if t is None:
            raise ValueError("WindowedDiffusionTransformer.forward needs t (N,) unless shared is given")
        cond = self.time_embed(t)  # (N, D)
        mod = self.modulation(cond).unsqueeze(1)  # (N, 1, 6, D)
        for block in self.blocks:
            x, _, _ = block(x, mod, rope=rope)
        out = self.final(x[:, n_obs * s :], cond)
        return out
