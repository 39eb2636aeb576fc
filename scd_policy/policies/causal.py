"""Shared machinery of the causal policies (``scd`` and ``causal_diffusion``).

Streaming (the policy itself holds no episode state): the protocol of ``Policy`` — ``init_state`` (a
``CausalStreamState``: the KV cache plus the newest step's context), ``observe`` (= ``encode_step``) and
``sample`` (= ``sample_chunk`` on the chosen streams' context) — is built on these lower-level calls:

- ``init_cache() -> KVCache``: an empty cache for B streams that keeps ``config.context_window`` steps
  (older steps are evicted; the sliding window is exact, see ``scd_policy.models.kv_cache``).
  ``cache.reset(streams)`` restarts chosen streams; ``cache.reset()`` all of them.
- ``encode_step(obs, prev_action, cache, prev_action_valid=None) -> context``: one incremental encoder
  call on the new step only: obs[key] (B, *shape) and the action executed at the previous step
  (B, Da) in raw units (``None`` or ``prev_action_valid`` False = episode start). Appends the step to
  ``cache`` and returns the context of that step (an immutable value; later calls do not change it).
- ``sample_chunk(context, *, num_inference_steps, generator, noise) -> (B, H, Da)``: K denoiser calls.
- ``encode_steps(obs, prev_action, prev_action_valid, cache)``: the same for T steps at once (priming a
  cache from a recorded history); returns the context of the last step.

``predict_chunk(history)`` is ``encode_steps`` on a fresh cache followed by ``sample_chunk``, and equals
calling ``encode_step`` once per step of the history and then ``sample_chunk`` (tested), also when the
history is longer than the window (sliding-window semantics, see ``scd_policy.models.kv_cache``).

Training batch (raw units, from ``WindowedDataset`` with this config's offsets): obs[key] (B, W, *shape),
``obs_is_pad`` (B, W), ``action`` (B, W + H, Da) at offsets -1 .. W + H - 2 from the window's first step
(index 0 = the previous action of step 0; the chunk of step i is ``action[:, i + 1 : i + 1 + H]``),
``action_is_pad`` (B, W + H) (index 0 True at an episode start).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from scd_policy import diffusion
from scd_policy.config import PolicyConfig
from scd_policy.conventions import ACTION_KEY
from scd_policy.models.causal_dit import History
from scd_policy.models.kv_cache import KVCache, StepCache
from scd_policy.models.normalizer import Normalizer
from scd_policy.models.tokenizer import StepTokenizer
from scd_policy.policies.base import Policy, StreamState

# What ``encode_step`` hands to ``sample_chunk``: SCD's context tokens c_t (B, n_ctx, D), or the
# monolithic baseline's prepared history keys/values. Each causal policy fixes its own type.
ContextT = TypeVar("ContextT", Tensor, History)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingInputs:
    """A causal training window after normalisation: what both causal policies' losses start from."""

    tokens: Tensor  # (B, W, S, D) step tokens (history noise already applied)
    chunks: Tensor  # (B, W', H, Da) normalised target chunks of the denoised steps (W' = W unless subset)
    mask: Tensor  # (B, W', H) bool: chunk element counts in the loss
    steps: Tensor  # (W',) long: the window steps whose chunks are denoised (``config.decoder_steps``)
    # (B, W) long: how many earlier steps of the window each step may attend to
    # (``config.random_history``); None: all of them.
    history_span: Tensor | None = None


class CausalStreamState(StreamState, Generic[ContextT]):
    """The causal policies' per-stream state: the KV cache of the window, the newest encoded step's
    context, and the steps observed with ``defer`` whose tokens wait for one encoder call (``pending``,
    each (B, 1, S, D); ``encode_pending`` appends them to the cache)."""

    def __init__(self, cache: KVCache, encode: Callable[[Tensor, KVCache], ContextT]) -> None:
        self.cache = cache
        self.context: ContextT | None = None
        self.pending: list[Tensor] = []
        self._encode: Callable[[Tensor, KVCache], ContextT] = encode

    def encode_pending(self) -> None:
        """Encode the buffered steps in one call (what one call per step would have cached, to float32
        rounding)."""
        if self.pending:
            # (B, T, S, D); a single step (every tick that is not deferred) goes in as it is, uncopied.
            tokens = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending, dim=1)
            self.pending = []
            self.context = self._encode(tokens, self.cache)

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.pending = []
            self.cache.reset()
        elif bool(streams.any()):
            self.encode_pending()  # the other streams' buffered steps happened: keep them
            self.cache.reset(streams)
        # The context of the reset streams is stale until the next observe(), which replaces it.

    def nbytes(self) -> int:
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in self.pending)


class CausalPolicy(Policy, Generic[ContextT]):
    def __init__(self, config: PolicyConfig, normalizer: Normalizer) -> None:
        super().__init__(config, normalizer)
        if config.context_window > config.train_window:
            log.warning(
                "policy.context_window=%d is longer than policy.train_window=%d: at run time the encoder "
                "attends further back than it ever did in training, which can cost success (set them "
                "equal, or train on longer windows)",
                config.context_window,
                config.train_window,
            )
        self.tokenizer = StepTokenizer(
            config.input_shapes,
            config.action_dim,
            config.d_model,
            config.image_tokens,
            config.image_channels,
            use_prev_action=config.prev_action_input,
        )

    # ------------------------------------------------------------------ network hooks

    @abstractmethod
    def new_cache(self, max_steps: int | None) -> KVCache:
        """An empty cache shaped for this policy's causal stack."""

    @abstractmethod
    def encode_tokens(self, tokens: Tensor, cache: StepCache) -> ContextT:
        """Append step tokens (B, T, S, D) to the cache; return the context of the last new step."""

    @abstractmethod
    def prepare_denoiser(self, context: ContextT, times: Tensor) -> diffusion.StepFn:
        """The denoiser of one sampling run at the network times ``times`` (K,): (x_t, k) -> prediction,
        computing what depends on t alone, or on the context alone, once."""

    @abstractmethod
    def context_streams(self, context: ContextT) -> int:
        """How many streams a context holds."""

    @abstractmethod
    def select_context(self, context: ContextT, rows: Tensor) -> ContextT:
        """The context of the streams ``rows`` (R,) only."""

    # ------------------------------------------------------------------ the streaming protocol

    def init_state(self, num_streams: int, context_window: int | None = None) -> CausalStreamState[ContextT]:
        if context_window is not None and context_window < 1:
            raise ValueError(f"context_window must be >= 1, got {context_window}")
        return CausalStreamState(
            self.new_cache(context_window or self.config.context_window), self.encode_tokens
        )

    def observe(
        self,
        state: StreamState,
        obs: Mapping[str, Tensor],
        prev_action: Tensor,
        prev_valid: Tensor,
        *,
        defer: bool = False,
    ) -> None:
        causal = self._causal_state(state)
        causal.pending.append(self.step_tokens(obs, prev_action, prev_valid))
        if not defer or self.buffer_full(causal):
            causal.encode_pending()

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
        causal = self._causal_state(state)
        causal.encode_pending()
        context = causal.context
        if context is None:
            raise RuntimeError("sample() before observe(): there is no step to plan for")
        if rows.numel() < self.context_streams(context):
            context = self.select_context(context, rows.to(self._device()))
        return self.sample_chunk(
            context, num_inference_steps=num_inference_steps, generator=generator, noise=noise, prefix=prefix
        )

    def buffer_full(self, causal: CausalStreamState[ContextT]) -> bool:
        """Whether a deferred step must be encoded now: it waits for the next sampled one, but never
        longer than the window, so what is buffered is at most one window (the block size
        predict_chunk encodes in too)."""
        return len(causal.pending) >= (causal.cache.max_steps or self.config.context_window)

    def _causal_state(self, state: StreamState) -> CausalStreamState[ContextT]:
        causal: CausalStreamState[ContextT] = self.own_state(state, CausalStreamState)
        return causal

    # ------------------------------------------------------------------ streaming interface

    def init_cache(self) -> KVCache:
        return self.new_cache(self.config.context_window)

    def tokenize(self, obs: Mapping[str, Tensor], prev_action: Tensor, prev_action_valid: Tensor) -> Tensor:
        """Raw obs (B, T, *shape), raw previous actions (B, T, Da), validity (B, T) -> tokens (B, T, S, D)."""
        b, t = prev_action_valid.shape
        obs_norm = self.normalize_obs(obs, (b, t), "encode")
        if tuple(prev_action.shape) != (b, t, self.config.action_dim):
            raise ValueError(
                f"prev_action has shape {tuple(prev_action.shape)}; expected {(b, t, self.config.action_dim)}"
            )
        prev_norm = self.normalizer.normalize(ACTION_KEY, prev_action.to(self._dtype()))
        tokens: Tensor = self.tokenizer(obs_norm, prev_norm, prev_action_valid.to(torch.bool))
        return tokens

    def encode_steps(
        self,
        obs: Mapping[str, Tensor],
        prev_action: Tensor,
        prev_action_valid: Tensor,
        cache: StepCache,
    ) -> ContextT:
        """Append T steps (obs (B, T, *shape), prev_action (B, T, Da) raw, validity (B, T)) to ``cache``;
        return the context of the last one."""
        return self.encode_tokens(self.tokenize(obs, prev_action, prev_action_valid), cache)

    def encode_step(
        self,
        obs: Mapping[str, Tensor],
        prev_action: Tensor | None,
        cache: StepCache,
        prev_action_valid: Tensor | None = None,
    ) -> ContextT:
        """One control step for B streams: obs[key] (B, *shape), prev_action (B, Da) raw or None."""
        return self.encode_tokens(self.step_tokens(obs, prev_action, prev_action_valid), cache)

    def step_tokens(
        self, obs: Mapping[str, Tensor], prev_action: Tensor | None, prev_action_valid: Tensor | None = None
    ) -> Tensor:
        """The tokens (B, 1, S, D) of one control step (arguments as ``encode_step``'s)."""
        first = obs.get(self.obs_keys[0])
        if first is None:
            raise KeyError(f"encode_step: observation key {self.obs_keys[0]!r} is missing; got {sorted(obs)}")
        b = first.shape[0]
        device = self._device()
        if prev_action is None:
            prev_action = torch.zeros(b, self.config.action_dim, device=device)
            prev_action_valid = torch.zeros(b, dtype=torch.bool, device=device)
        elif prev_action_valid is None:
            prev_action_valid = torch.ones(b, dtype=torch.bool, device=device)
        return self.tokenize(
            {key: value.unsqueeze(1) for key, value in obs.items() if key in self.config.input_shapes},
            prev_action.unsqueeze(1),
            prev_action_valid.unsqueeze(1),
        )

    def sample_chunk(
        self,
        context: ContextT,
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """K denoiser calls from noise to the chunk of the context's step; (B, H, Da) in raw units
        (its first actions ``prefix`` (B, P, Da) raw if given, see ``Policy.sample``)."""
        batch = self.context_streams(context)
        shape = (batch, self.config.horizon, self.config.action_dim)
        x0 = diffusion.sample(
            lambda times: self.prepare_denoiser(context, times),
            shape,
            self.config.diffusion,
            num_steps=num_inference_steps,
            generator=generator,
            noise=noise,
            device=self._device(),
            dtype=self._dtype(),
            prefix=self.normalized_prefix(prefix),
            prefix_start=-self.config.chunk_start_offset,  # past_actions: the chunk starts P steps back
        )
        return self.normalizer.unnormalize(ACTION_KEY, x0)

    @torch.no_grad()
    def predict_chunk(
        self,
        history: Mapping[str, Tensor],
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """history: obs[key] (B, T, *shape) for steps 1..T, ``"action"`` (B, T-1, Da) executed at steps
        1..T-1 (may be absent when T = 1), optional ``"prev_action"`` (B, Da) executed before step 1
        (otherwise step 1 is an episode start).

        Histories longer than ``context_window`` are encoded with the same sliding window a streaming
        runtime uses (each step attends to the last ``context_window`` steps), so this equals
        ``encode_step`` called once per step followed by ``sample_chunk``. To condition on the last N
        steps only, pass only those (with ``prev_action``)."""
        first = self.obs_keys[0]
        if first not in history:
            raise KeyError(f"predict_chunk: observation key {first!r} is missing; got keys {sorted(history)}")
        b, t = history[first].shape[:2]
        device, dtype, da = self._device(), self._dtype(), self.config.action_dim
        actions = history.get(ACTION_KEY)
        if actions is None:
            if t > 1:
                raise KeyError(f"predict_chunk: 'action' (B, T-1, Da) = {(b, t - 1, da)} is missing")
            actions = torch.zeros(b, 0, da, device=device, dtype=dtype)
        self.check_tensor({ACTION_KEY: actions}, ACTION_KEY, (b, t - 1, da), "predict_chunk")
        first_prev = history.get("prev_action")
        if first_prev is not None:
            self.check_tensor(history, "prev_action", (b, da), "predict_chunk")
        # Previous action of every step: step 1 gets prev_action (or none), step s > 1 gets action s-1.
        lead = first_prev if first_prev is not None else torch.zeros(b, da, device=device, dtype=dtype)
        prev = torch.cat([lead.to(device, dtype)[:, None], actions.to(device, dtype)], dim=1)  # (B, T, Da)
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
        valid[:, 0] = first_prev is not None
        # The whole history goes through a cache of context_window steps, in blocks of that size (bounded
        # memory): exactly what a streaming runtime computes step by step (see models/kv_cache.py).
        cache = self.init_cache()
        block = self.config.context_window
        context: ContextT | None = None
        for start in range(0, t, block):
            stop = min(start + block, t)
            obs = {key: history[key][:, start:stop].to(device) for key in self.obs_keys if key in history}
            context = self.encode_steps(obs, prev[:, start:stop], valid[:, start:stop], cache)
        assert context is not None  # t >= 1
        return self.sample_chunk(
            context, num_inference_steps=num_inference_steps, generator=generator, noise=noise
        )

    # ------------------------------------------------------------------ training

    def training_inputs(self, batch: Mapping[str, Tensor]) -> TrainingInputs:
        """Check and normalise a training window (see the module docstring); ``batch`` is left untouched."""
        first = self.obs_keys[0]
        if first not in batch:
            raise KeyError(f"compute_loss: observation key {first!r} is missing; got keys {sorted(batch)}")
        b, w = batch[first].shape[:2]
        h, da = self.config.horizon, self.config.action_dim
        n_actions = len(self.config.action_offsets)  # w + h, or w + h + P - 1 with past_actions P > 1
        # Index of the previous action of step 0, and of the first action of step 0's chunk.
        lead = n_actions - (w + h - 1)
        first_chunk = lead + self.config.chunk_start_offset
        obs_is_pad = self.check_tensor(batch, "obs_is_pad", (b, w), "compute_loss").to(torch.bool)
        action = self.check_tensor(batch, ACTION_KEY, (b, n_actions, da), "compute_loss")
        action_is_pad = self.check_tensor(batch, "action_is_pad", (b, n_actions), "compute_loss").to(
            torch.bool
        )
        obs = {
            key: self.history_noise(x) for key, x in self.normalize_obs(batch, (b, w), "compute_loss").items()
        }
        action_norm = self.normalizer.normalize(ACTION_KEY, action.to(self._dtype()))  # (B, W+H, Da)
        prev = slice(lead - 1, lead - 1 + w)  # the previous action of each step
        prev_valid = ~action_is_pad[:, prev]  # padded previous action: episode start -> "no previous action"
        if self.training and self.config.prev_action_dropout > 0:
            kept = torch.rand(b, w, device=prev_valid.device) >= self.config.prev_action_dropout
            prev_valid = prev_valid & kept
        tokens = self.tokenizer(obs, self.history_noise(action_norm[:, prev]), prev_valid)
        # Chunk of step i = its H actions from offset i + chunk_start_offset on (sliding windows); a
        # past action before the episode start is padding and masked out of the loss.
        chunks = action_norm[:, first_chunk:].unfold(1, h, 1)[:, :w].transpose(-1, -2)  # (B, W, H, Da)
        chunk_pad = action_is_pad[:, first_chunk:].unfold(1, h, 1)[:, :w]  # (B, W, H)
        mask = ~chunk_pad & ~obs_is_pad[:, :, None]
        steps = torch.arange(w, device=tokens.device)
        if self.training and 0 < self.config.decoder_steps < w:
            # Denoise a random subset of the steps (the encoder still reads them all): the cost of a
            # training step then grows with the window through the encoder only.
            steps = torch.randperm(w, device=tokens.device)[: self.config.decoder_steps].sort().values
            chunks, mask = chunks[:, steps], mask[:, steps]
        span = None
        if self.training and self.config.random_history > 0:
            earlier = torch.arange(w, device=tokens.device).expand(b, w)  # steps before each one
            drawn = (torch.rand(b, w, device=tokens.device) * (earlier + 1)).long()  # uniform in 0..i
            cut = torch.rand(b, w, device=tokens.device) < self.config.random_history
            span = torch.where(cut, drawn, earlier)
        return TrainingInputs(tokens=tokens, chunks=chunks, mask=mask, steps=steps, history_span=span)
