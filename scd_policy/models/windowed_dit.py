"""Non-causal diffusion transformer over a fixed observation window: the ``diffusion_policy`` baseline.

Tokens of the last ``n_obs_steps`` observations and the noisy chunk form one bidirectional sequence that
is re-run through all layers at every denoising call (Chi et al. 2023, transformer variant). The noise
level conditions every token through AdaLN-Zero, as in the other policies' denoisers; RoPE numbers the
observation tokens by step and puts the chunk at the current step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scd_policy.models.layers import AdaLNDenoiser, NoiseLevels, rope_cos_sin


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
        levels: NoiseLevels,
        obs_tokens: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x_t (N, H, Da) at noise ``levels`` (``noise_levels(t)`` or ``prepare(times).at(k)``),
        obs_tokens (N, n_obs, S, D) -> prediction (N, H, Da); ``rope`` (from ``positions``) may be
        passed to skip rebuilding it at every call of a sampling run."""
        n, n_obs, s, d = obs_tokens.shape
        h = x_t.shape[1]
        x = torch.cat([obs_tokens.reshape(n, n_obs * s, d), self.chunk_embed(x_t)], dim=1)
        rope = rope if rope is not None else self.positions(n_obs, s, h, x.device)
        for block, mod in zip(self.blocks, levels.blocks, strict=True):
            x, _, _ = block(x, mod, rope=rope)
        out: Tensor = self.final(x[:, n_obs * s :], levels.final)
        return out
