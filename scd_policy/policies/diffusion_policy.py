"""Windowed Diffusion Policy baseline (Chi et al. 2023 style, transformer denoiser).

The last ``n_obs_steps`` observations are tokenised (same step tokeniser as the causal policies, without
the previous-action token) once per chunk, and a non-causal AdaLN-Zero transformer of depth
``encoder_layers + decoder_layers`` over ``[observation tokens ; noisy chunk]`` is re-run at every
denoising call. The chunk starts ``n_obs_steps - 1`` steps in the past (``config.chunk_start_offset``).

Training batch (raw units): obs[key] (B, n_obs, *shape), ``obs_is_pad`` (B, n_obs) (edge-padded copies
of the first observation at an episode start, used as they are, as in Diffusion Policy), ``action``
(B, H, Da), ``action_is_pad`` (B, H) masking the loss. R = ``decoder_repeats`` noise draws per sample,
as for the causal policies, so every policy sees the same number of noise draws per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from scd_policy import diffusion
from scd_policy.config import PolicyConfig
from scd_policy.conventions import ACTION_KEY
from scd_policy.models.normalizer import Normalizer
from scd_policy.models.tokenizer import StepTokenizer
from scd_policy.models.windowed_dit import WindowedDiffusionTransformer
from scd_policy.policies.base import Policy, StreamState, masked_mse


def last_steps_edge_padded(x: Tensor, n: int) -> Tensor:
    """The last ``n`` steps of x (B, T, ...), T >= 1; fewer are padded at the front with the oldest one,
    as the dataset pads an episode start (the one home of that convention at run time)."""
    b, t = x.shape[:2]
    x = x[:, max(t - n, 0) :]
    if t < n:
        x = torch.cat([x[:, :1].expand(b, n - t, *x.shape[2:]), x], dim=1)
    return x


class ObservationWindow(StreamState):
    """The windowed baseline's per-stream state: its last ``n_obs_steps`` raw observations."""

    def __init__(self, num_streams: int, n_obs: int) -> None:
        self.n_obs = n_obs
        self.window: dict[str, Tensor] = {}  # key -> (N, n_obs, *shape)
        self.length = torch.zeros(num_streams, dtype=torch.long)  # steps seen since each stream's reset

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.length.zero_()
        else:
            self.length[streams.to("cpu")] = 0

    def push(self, obs: Mapping[str, Tensor]) -> None:
        """Append one step (N, *shape) per key; a stream just reset gets a window of copies of it."""
        fresh = self.length == 0
        for key, value in obs.items():
            step = value[:, None]  # (N, 1, *shape)
            if key not in self.window:
                self.window[key] = step.repeat(1, self.n_obs, *([1] * (value.dim() - 1)))
            shifted = torch.cat([self.window[key][:, 1:], step], dim=1)
            # A fresh stream's window is all copies of its first step (last_steps_edge_padded of one step).
            mask = fresh.to(value.device).view(-1, *([1] * (shifted.dim() - 1)))
            self.window[key] = torch.where(mask, step.expand_as(shifted), shifted)
        self.length += 1


class DiffusionPolicy(Policy):
    policy_type = "diffusion_policy"

    def __init__(self, config: PolicyConfig, normalizer: Normalizer) -> None:
        super().__init__(config, normalizer)
        self.tokenizer = StepTokenizer(
            config.input_shapes,
            config.action_dim,
            config.d_model,
            config.image_tokens,
            config.image_channels,
            use_prev_action=False,
        )
        self.model = WindowedDiffusionTransformer(
            config.d_model,
            config.n_heads,
            config.encoder_layers + config.decoder_layers,
            config.mlp_ratio,
            config.dropout,
            config.action_dim,
            config.horizon,
        )

    # ------------------------------------------------------------------ the streaming protocol

    def init_state(self, num_streams: int, context_window: int | None = None) -> ObservationWindow:
        return ObservationWindow(num_streams, self.config.n_obs_steps)

    def observe(
        self,
        state: StreamState,
        obs: Mapping[str, Tensor],
        prev_action: Tensor,
        prev_valid: Tensor,
        *,
        defer: bool = False,
    ) -> None:
        # A window policy only queues the observation (its encoder runs once per chunk, in sample()).
        self.own_state(state, ObservationWindow).push(obs)

    def sample(
        self,
        state: StreamState,
        rows: Tensor,
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        own = self.own_state(state, ObservationWindow)
        window = own.window
        if rows.numel() < own.length.numel():
            rows_dev = rows.to(self._device())
            window = {key: value[rows_dev] for key, value in window.items()}
        return self.predict_chunk(
            window, num_inference_steps=num_inference_steps, generator=generator, noise=noise, prefix=prefix
        )

    def sample_many(
        self,
        states: Sequence[StreamState],
        *,
        noise: Tensor,
        num_inference_steps: int | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        # The states' windows side by side: one batched denoising run.
        windows = [self.own_state(state, ObservationWindow).window for state in states]
        window = {key: torch.cat([w[key] for w in windows]) for key in windows[0]}
        return self.predict_chunk(window, num_inference_steps=num_inference_steps, noise=noise, prefix=prefix)

    def compile_denoiser(self) -> None:
        self.model.compile(mode=self._compile_mode())

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        first = self.obs_keys[0]
        if first not in batch:
            raise KeyError(f"compute_loss: observation key {first!r} is missing; got keys {sorted(batch)}")
        b, n_obs = batch[first].shape[:2]
        if n_obs != self.config.n_obs_steps:
            raise ValueError(
                f"compute_loss: {first!r} holds {n_obs} steps; expected n_obs_steps={self.config.n_obs_steps}"
            )
        h, da, r = self.config.horizon, self.config.action_dim, self.config.decoder_repeats
        action = self.check_tensor(batch, ACTION_KEY, (b, h, da), "compute_loss")
        action_is_pad = self.check_tensor(batch, "action_is_pad", (b, h), "compute_loss").to(torch.bool)
        obs = {
            key: self.history_noise(x)
            for key, x in self.normalize_obs(batch, (b, n_obs), "compute_loss").items()
        }
        tokens = self.tokenizer(obs)  # (B, n_obs, S, D): once per sample, shared by the R draws
        tokens = tokens.repeat(r, 1, 1, 1)  # (R*B, n_obs, S, D)
        x0 = self.normalizer.normalize(ACTION_KEY, action.to(self._dtype())).repeat(r, 1, 1)  # (R*B, H, Da)
        mask = (~action_is_pad).repeat(r, 1)
        noise = torch.randn_like(x0)
        t = diffusion.sample_train_times(r * b, self.config.diffusion, device=x0.device)
        x_t = diffusion.add_noise(x0, noise, t, self.config.diffusion)
        prediction = self.model(x_t, self.model.noise_levels(t), tokens)
        loss = masked_mse(prediction, diffusion.training_target(x0, noise, self.config.diffusion), mask)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict_chunk(
        self,
        history: Mapping[str, Tensor],
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """history: obs[key] (B, T, *shape), the last T observations (T >= 1). The last ``n_obs_steps``
        are used; fewer are edge-padded at the front with the oldest one, as the dataset pads an episode
        start. Returns the chunk (B, H, Da) in raw units, starting ``n_obs_steps - 1`` steps back;
        ``prefix`` (B, P, Da) raw: its first P actions from the current step on (``Policy.sample``)."""
        first = self.obs_keys[0]
        if first not in history:
            raise KeyError(f"predict_chunk: observation key {first!r} is missing; got keys {sorted(history)}")
        b = history[first].shape[0]
        n_obs = self.config.n_obs_steps
        device = self._device()
        obs = {}
        for key in self.obs_keys:
            if key not in history:
                raise KeyError(
                    f"predict_chunk: observation key {key!r} is missing; got keys {sorted(history)}"
                )
            obs[key] = last_steps_edge_padded(history[key].to(device), n_obs)
        tokens = self.tokenizer(self.normalize_obs(obs, (b, n_obs), "predict_chunk"))  # once per chunk
        model = self.model

        def prepare(times: Tensor) -> diffusion.StepFn:
            # Once per chunk: the K steps' modulations and the RoPE tables.
            shared = model.prepare(times)
            rope = model.positions(n_obs, tokens.shape[2], self.config.horizon, tokens.device)
            return lambda x, k: model(x, shared.at(k), tokens, rope)

        x0 = diffusion.sample(
            prepare,
            (b, self.config.horizon, self.config.action_dim),
            self.config.diffusion,
            num_steps=num_inference_steps,
            generator=generator,
            noise=noise,
            device=device,
            dtype=self._dtype(),
            prefix=self.normalized_prefix(prefix),
            prefix_start=-self.config.chunk_start_offset,  # the chunk starts n_obs_steps - 1 steps back
        )
        return self.normalizer.unnormalize(ACTION_KEY, x0)
