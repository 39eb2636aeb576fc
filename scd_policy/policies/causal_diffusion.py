"""Monolithic causal diffusion policy: the paper's "Causal DiT" baseline, with a KV cache of the history.

One ``CausalDiffusionTransformer`` of depth ``encoder_layers + decoder_layers``. Each step's clean tokens
go through every layer once (``encode_step``: L layer calls) and are cached; the noisy chunk tokens go
through every layer at every denoising call, attending to the cached history (``sample_chunk``: K * L
layer calls). Same tokeniser, width, conditioning style (AdaLN-Zero) and training recipe as SCD
(teacher forcing over windows, R noise draws per history pass, masks), minus the context noise, which
has no counterpart without a context bottleneck. All parameters train at the base lr.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from scd_policy import diffusion
from scd_policy.config import PolicyConfig
from scd_policy.models.causal_dit import CausalDiffusionTransformer, History
from scd_policy.models.kv_cache import KVCache, StepCache
from scd_policy.models.normalizer import Normalizer
from scd_policy.policies.base import masked_mse
from scd_policy.policies.causal import CausalPolicy


class CausalDiffusionPolicy(CausalPolicy[History]):
    policy_type = "causal_diffusion"

    def __init__(self, config: PolicyConfig, normalizer: Normalizer) -> None:
        super().__init__(config, normalizer)
        self.model = CausalDiffusionTransformer(
            config.d_model,
            config.n_heads,
            config.encoder_layers + config.decoder_layers,
            config.mlp_ratio,
            config.dropout,
            config.action_dim,
            config.horizon,
        )
        # The denoiser call of the K-step loop; compile_denoiser() swaps in a compiled one.
        self._denoise_with = self.model.denoise_with

    def new_cache(self, max_steps: int | None) -> KVCache:
        return self.model.new_cache(max_steps)

    def encode_tokens(self, tokens: Tensor, cache: StepCache) -> History:
        # Its context is the cache itself (a History view), so it encodes one cache at a time; several
        # sessions' states go through the protocol's one-state-at-a-time default.
        if not isinstance(cache, KVCache):
            raise TypeError(f"causal_diffusion encodes into one KVCache; got {type(cache).__name__}")
        self.model.encode(tokens, cache)
        return History.from_cache(cache)

    def context_streams(self, context: History) -> int:
        return int(context.keys[0].shape[0])

    def select_context(self, context: History, rows: Tensor) -> History:
        return context.select(rows)

    def compile_denoiser(self) -> None:
        self._denoise_with = torch.compile(self.model.denoise_with, mode=self._compile_mode())

    def prepare_denoiser(self, context: History, times: Tensor) -> diffusion.StepFn:
        model = self.model
        shared = model.prepare(times)  # the K steps' modulations in one batched pass
        step_index = torch.tensor([context.last_step], device=times.device)
        attend = model.attention_inputs(context, step_index, context.keys[0].shape[0], self.config.horizon)

        denoise_with = self._denoise_with

        def step(x: Tensor, k: int) -> Tensor:
            out: Tensor = denoise_with(x[:, None], shared.at(k), attend)
            return out[:, 0]

        return step

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        inputs = self.training_inputs(batch)
        b, w, h, da = inputs.chunks.shape
        r = self.config.decoder_repeats
        cache = self.model.new_cache(None)
        self.model.encode(inputs.tokens, cache)  # history pass over the whole window, once
        history = History.from_cache(cache)
        # Groups g = (repeat, step), repeat-major; chunk group g sees the history up to its step.
        x0 = inputs.chunks.repeat(1, r, 1, 1)  # (B, R*W, H, Da)
        mask = inputs.mask.repeat(1, r, 1)  # (B, R*W, H)
        step = inputs.steps.repeat(r)  # (R*W,): the window step of each chunk group
        noise = torch.randn_like(x0)
        t = diffusion.sample_train_times(b * r * w, self.config.diffusion, device=x0.device).view(b, r * w)
        x_t = diffusion.add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t.flatten(), self.config.diffusion)
        prediction = self.model.denoise(x_t.view(b, r * w, h, da), t, history, step)
        loss = masked_mse(prediction, diffusion.training_target(x0, noise, self.config.diffusion), mask)
        return loss, {"loss": float(loss.detach()), "valid_fraction": float(inputs.mask.float().mean())}
