"""Separable Causal Diffusion policy: a causal encoder run once per step, a small decoder run K times.

- ``encoder`` (``CausalEncoder``, ``encoder_layers`` deep): block-causal over the steps' tokens, KV-cached;
  emits ``c_t`` (``n_context_tokens`` tokens) for every step.
- ``decoder`` (``DiffusionDecoder``, ``decoder_layers`` deep): AdaLN-Zero DiT over ``[c_t ; noisy chunk]``,
  no history access; K calls per replan.

Training (``compute_loss``): the encoder runs once over the whole window (teacher forcing) and gives c_t
for every step; the decoder then denoises every step's chunk independently with R =
``decoder_repeats`` noise draws per encoder pass, on ``c_t + context_noise * N(0, I)`` (in train mode
only, like ``history_noise`` on the normalised inputs). Loss: MSE to the flow velocity (or DDPM noise),
masked by ``action_is_pad`` per chunk element and by ``obs_is_pad`` per step. The decoder's parameters
form their own AdamW groups at ``lr * decoder_lr_scale``.

Streaming (see ``scd_policy.policies.causal``): ``encode_step`` = one encoder call (L_enc layers) on the
new step; ``sample_chunk`` = K decoder calls (K * L_dec layers), independent of the history length.
``observe_many`` / ``sample_many`` batch that over separate single-stream states (a server's sessions):
one tokenizer call, one encoder call over their ``StackedCache`` per number of buffered steps (all
states but those that defer encoding), and one decoder run over their contexts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scd_policy import diffusion
from scd_policy.config import PolicyConfig
from scd_policy.models.decoder import DiffusionDecoder
from scd_policy.models.encoder import CausalEncoder
from scd_policy.models.kv_cache import KVCache, StackedCache, StepCache
from scd_policy.models.normalizer import Normalizer
from scd_policy.policies.base import StreamState, masked_mse
from scd_policy.policies.causal import CausalPolicy, CausalStreamState

if TYPE_CHECKING:
    from scd_policy.backends.engine import StepEngine


class SeparableCausalDiffusionPolicy(CausalPolicy[Tensor]):
    policy_type = "scd"

    def __init__(self, config: PolicyConfig, normalizer: Normalizer) -> None:
        super().__init__(config, normalizer)
        self.encoder = CausalEncoder(
            config.d_model,
            config.n_heads,
            config.encoder_layers,
            config.mlp_ratio,
            config.dropout,
            config.n_context_tokens,
        )
        self.decoder = DiffusionDecoder(
            config.d_model,
            config.n_heads,
            config.decoder_layers,
            config.mlp_ratio,
            config.dropout,
            config.action_dim,
            config.horizon,
            config.n_context_tokens,
            step_conditioning=config.diffusion.shortcut,
        )
        # What runs the encoder step and the decoder calls at inference when not this module's own
        # torch code (``scd_policy.backends.attach_backend``); training never goes through it.
        self.engine: StepEngine | None = None

    def decoder_parameter_prefixes(self) -> tuple[str, ...]:
        return ("decoder.",)

    def new_cache(self, max_steps: int | None) -> KVCache:
        return self.encoder.new_cache(max_steps)

    def encode_tokens(self, tokens: Tensor, cache: StepCache) -> Tensor:
        if self.engine is not None:
            return self.engine.encode(tokens, cache)[:, -1]
        context: Tensor = self.encoder(tokens, cache)  # (B, T, n_ctx, D)
        return context[:, -1]

    def observe_many(
        self,
        states: Sequence[StreamState],
        obs: Mapping[str, Tensor],
        prev_action: Tensor,
        prev_valid: Tensor,
        *,
        defer: bool = False,
    ) -> None:
        # One tokenizer call for every state's step, then one encoder call per number of buffered
        # steps over the states' own caches (each keeps its own steps and window).
        if len(states) == 1:  # the single-stream path itself, bit for bit
            self.observe(states[0], obs, prev_action, prev_valid, defer=defer)
            return
        owned = [self._causal_state(state) for state in states]
        tokens = self.step_tokens(obs, prev_action, prev_valid)  # (R, 1, S, D)
        for row, state in enumerate(owned):
            state.pending.append(tokens[row : row + 1])
        self.encode_pending_many([state for state in owned if not defer or self.buffer_full(state)])

    def encode_pending_many(self, states: Sequence[CausalStreamState[Tensor]]) -> None:
        """``encode_pending`` of every state, batched: the states that buffered the same number of steps
        (T) go through one encoder call over their ``StackedCache`` ((G, T, S, D) tokens). A server's
        sessions that replan at one tick after the same open-loop cycle all buffered the same T."""
        groups: dict[int, list[CausalStreamState[Tensor]]] = {}
        for state in states:
            if state.pending:
                groups.setdefault(len(state.pending), []).append(state)
        for members in groups.values():
            if len(members) == 1:
                members[0].encode_pending()
                continue
            tokens = torch.cat([torch.cat(state.pending, dim=1) for state in members])  # (G, T, S, D)
            context = self.encode_tokens(tokens, StackedCache([state.cache for state in members]))
            for row, state in enumerate(members):
                state.pending = []
                state.context = context[row : row + 1]  # (1, n_ctx, D)

    def sample_many(
        self,
        states: Sequence[StreamState],
        *,
        noise: Tensor,
        num_inference_steps: int | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        # One decoder run over the states' contexts side by side.
        owned = [self._causal_state(state) for state in states]
        self.encode_pending_many(owned)
        contexts = [state.context for state in owned]
        if any(context is None for context in contexts):
            raise RuntimeError("sample_many() before observe(): a state has no step to plan for")
        context = torch.cat([c for c in contexts if c is not None])  # (R, n_ctx, D)
        return self.sample_chunk(context, num_inference_steps=num_inference_steps, noise=noise, prefix=prefix)

    def context_streams(self, context: Tensor) -> int:
        return int(context.shape[0])

    def select_context(self, context: Tensor, rows: Tensor) -> Tensor:
        return context[rows]

    def compile_denoiser(self) -> None:
        self.decoder.compile(mode=self._compile_mode())

    def prepare_denoiser(self, context: Tensor, times: Tensor) -> diffusion.StepFn:
        # The K steps' modulations in one batched pass; a shortcut decoder is told its step size 1/K.
        step_size = 1.0 / len(times) if self.config.diffusion.shortcut else None
        if self.engine is not None:
            return self.engine.denoiser(times, step_size, context)

        shared = self.decoder.prepare(times, step_size)
        decoder = self.decoder

        def step(x: Tensor, k: int) -> Tensor:
            out: Tensor = decoder(x, shared.at(k), context)
            return out

        return step

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        inputs = self.training_inputs(batch)
        b, w, h, da = inputs.chunks.shape
        r = self.config.decoder_repeats
        context: Tensor = self.encoder(inputs.tokens, history_span=inputs.history_span)[
            :, inputs.steps
        ]  # (B, W', n_ctx, D): the denoised steps
        n_ctx, d = context.shape[-2:]
        # R noise draws per encoder pass: every (repeat, step) pair is an independent decoder sample.
        context = context.unsqueeze(1).expand(b, r, w, n_ctx, d).reshape(b * r * w, n_ctx, d)
        if self.training and self.config.context_noise > 0:  # validation loss sees the clean context
            context = context + self.config.context_noise * torch.randn_like(context)
        x0 = inputs.chunks.unsqueeze(1).expand(b, r, w, h, da).reshape(b * r * w, h, da)
        mask = inputs.mask.unsqueeze(1).expand(b, r, w, h).reshape(b * r * w, h)
        decoder = self.decoder

        def denoise(x: Tensor, t: Tensor, step: Tensor, rows: slice) -> Tensor:  # shortcut targets
            out: Tensor = decoder(x, decoder.noise_levels(t, step), context[rows])
            return out

        example = diffusion.training_example(x0, self.config.diffusion, denoise)
        prediction = decoder(
            example.x_t, decoder.noise_levels(example.t, example.step), context
        )  # (N, H, Da)
        loss = masked_mse(prediction, example.target, mask)
        return loss, {"loss": float(loss.detach()), "valid_fraction": float(inputs.mask.float().mean())}
