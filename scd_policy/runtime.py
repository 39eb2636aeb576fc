"""Deployment runtime: ``reset()`` and ``step(obs) -> action`` for every policy type.

What a robot (or a simulation loop) calls at every control tick. For the causal policies (``scd`` and
``causal_diffusion``) each call runs the encoder once, on the new step only (KV cache, bounded to
``context_window`` steps with exact sliding-window eviction), with the action executed at the previous
tick fed back as that step's "previous action" token; a replan then runs K denoiser calls. For
``diffusion_policy`` each replan re-encodes its window of the last ``n_obs_steps`` observations.

Execution modes:

- open loop (default): a chunk is sampled and its ``n_action_steps`` actions are executed one per tick
  before the next replan;
- ``replan_every_step=True``: a new chunk at every tick, smoothed with ACT-style temporal ensembling over
  the overlapping chunks (``ensemble_decay``: weight ``exp(-decay * i)`` with i = 0 the oldest chunk),
  cheap for SCD because the history is never re-encoded.

Batched form: ``num_envs`` parallel streams, observations with a leading ``num_envs`` axis (omit it when
``num_envs == 1``), ``reset(mask)`` restarts the chosen streams only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scd_policy.data.dataset import images_to_policy
from scd_policy.policies import Policy, load_policy
from scd_policy.policies.causal import CausalPolicy

ObsValue = np.ndarray | Tensor


class ObservationError(ValueError):
    """An observation passed to ``step`` has a missing/extra key, a wrong shape or dtype, or NaN/inf."""


class SCDPolicy:
    """The streaming policy API for any trained policy (scd, causal_diffusion, diffusion_policy).

    Example::

        policy = SCDPolicy.from_pretrained("runs/push_t/best")
        policy.reset()
        action = policy.step({"state": state})  # raw units in, raw units out
    """

    def __init__(
        self,
        policy: Policy,
        *,
        num_envs: int = 1,
        n_action_steps: int | None = None,
        num_inference_steps: int | None = None,
        replan_every_step: bool = False,
        ensemble_decay: float = 0.01,
        seed: int | None = 0,
        num_threads: int | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        cfg = policy.config
        max_steps = cfg.horizon + cfg.chunk_start_offset
        n_action_steps = n_action_steps or cfg.n_action_steps
        if not 1 <= n_action_steps <= max_steps:
            raise ValueError(f"n_action_steps={n_action_steps} must be in [1, {max_steps}] for this policy")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.policy = policy.eval()
        self.config = cfg
        self.num_envs = num_envs
        self.n_action_steps = 1 if replan_every_step else n_action_steps
        self.num_inference_steps = num_inference_steps
        self.replan_every_step = replan_every_step
        self.ensemble_decay = ensemble_decay
        self.device = next(policy.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.latencies_ms: list[float] = []
        self._images = {key for key, shape in cfg.input_shapes.items() if len(shape) == 3}
        self._action_dim = cfg.action_dim
        self._cache = policy.init_cache() if isinstance(policy, CausalPolicy) else None
        self.reset()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> SCDPolicy:
        """Load a policy folder (``model.safetensors`` + ``config.json``) written by training."""
        return cls(load_policy(path, device=device), **kwargs)

    # ------------------------------------------------------------------ state

    @torch.inference_mode()  # the state tensors are inference tensors: create and update them in this mode
    def reset(self, mask: Sequence[bool] | np.ndarray | None = None) -> None:
        """Forget the episode of every stream (``mask`` None) or of the streams where ``mask`` is True."""
        n, h, da = self.num_envs, self.config.horizon, self._action_dim
        if mask is None:
            streams = torch.ones(n, dtype=torch.bool)
            self._queue = torch.zeros(n, self.n_action_steps, da, device=self.device)
            self._queue_pos = torch.full((n,), self.n_action_steps, dtype=torch.long)
            self._prev_action = torch.zeros(n, da, device=self.device)
            self._prev_valid = torch.zeros(n, dtype=torch.bool, device=self.device)
            self._window: dict[str, Tensor] = {}
            self._window_len = torch.zeros(n, dtype=torch.long)
            # Temporal ensembling: chunk made `a` ticks ago, realigned so index 0 is the current tick.
            self._ens_chunks = torch.zeros(n, h, h, da, device=self.device)  # (N, age, H, Da)
            self._ens_count = torch.zeros(n, dtype=torch.long)
        else:
            streams = torch.as_tensor(np.asarray(mask, dtype=bool))
            if streams.shape != (n,):
                raise ValueError(f"reset mask has shape {tuple(streams.shape)}; expected ({n},)")
            self._queue_pos[streams] = self.n_action_steps
            self._prev_valid[streams.to(self.device)] = False
            self._window_len[streams] = 0
            self._ens_count[streams] = 0
        if self._cache is not None:
            self._cache.reset(None if mask is None else streams.to(self.device))

    # ------------------------------------------------------------------ the control tick

    @torch.inference_mode()
    def step(self, obs: Mapping[str, ObsValue]) -> np.ndarray:
        """One control tick: observation(s) in raw units -> action(s) in raw units.

        ``obs[key]``: (*shape) when ``num_envs == 1`` (a leading axis of 1 is accepted too), else
        (num_envs, *shape); images as HWC uint8 (as environments render them) or CHW float in [0, 1].
        Returns (Da,) for a single unbatched stream, else (num_envs, Da).
        """
        start = time.perf_counter()
        batched_input, tensors = self._check_obs(obs)
        if isinstance(self.policy, CausalPolicy):
            assert self._cache is not None
            context = self.policy.encode_step(tensors, self._prev_action, self._cache, self._prev_valid)
            need = self._needs_replan()
            if need.any():
                chunk = self.policy.sample_chunk(
                    context, num_inference_steps=self.num_inference_steps, generator=self.generator
                )
                self._commit(chunk, need)
        else:
            self._push_window(tensors)
            need = self._needs_replan()
            if need.any():
                chunk = self.policy.predict_chunk(
                    self._window, num_inference_steps=self.num_inference_steps, generator=self.generator
                )
                # The chunk starts n_obs_steps - 1 ticks back: drop the part already in the past.
                self._commit(chunk[:, -self.config.chunk_start_offset :], need)
        action = self._pop_action()
        self._prev_action = action
        self._prev_valid[:] = True
        out = action.detach().to("cpu", torch.float32).numpy()
        self.latencies_ms.append(1000.0 * (time.perf_counter() - start))
        return out if batched_input else out[0]

    def latency_stats(self, warmup: int = 5) -> dict[str, float]:
        """p50/p90/mean per-step latency in ms over the steps after the first ``warmup``."""
        values = np.array(self.latencies_ms[warmup:] or self.latencies_ms or [np.nan])
        return {
            "p50_ms": float(np.percentile(values, 50)),
            "p90_ms": float(np.percentile(values, 90)),
            "mean_ms": float(values.mean()),
            "steps": float(len(values)),
        }

    # ------------------------------------------------------------------ internals

    def _needs_replan(self) -> Tensor:
        return self._queue_pos >= self.n_action_steps  # (N,) bool, on CPU

    def _commit(self, chunk: Tensor, streams: Tensor) -> None:
        """Store a freshly sampled chunk (N, >=n_action_steps, Da) for the streams that asked for it."""
        streams_dev = streams.to(self.device)
        if self.replan_every_step:
            # Age every stored chunk by one tick (shift its predictions left), then add the new one.
            aged = torch.zeros_like(self._ens_chunks)
            aged[:, 1:, :-1] = self._ens_chunks[:, :-1, 1:]
            aged[:, 0, : chunk.shape[1]] = chunk[:, : self.config.horizon]
            self._ens_chunks = torch.where(streams_dev[:, None, None, None], aged, self._ens_chunks)
            # A chunk of length L predicts the current tick only while its age is < L.
            bumped = (self._ens_count + 1).clamp(max=chunk.shape[1])
            self._ens_count = torch.where(streams, bumped, self._ens_count)
            ages = torch.arange(aged.shape[1], device=self.device)
            count = self._ens_count.to(self.device)[:, None]  # chunks available: ages 0 .. count-1
            valid = ages[None, :] < count
            # ACT weighting: the oldest available chunk gets weight 1, each newer one exp(-decay) less.
            weights = torch.exp(-self.ensemble_decay * (count - 1 - ages[None, :]).clamp(min=0).float())
            weights = weights * valid
            action = (weights[:, :, None] * self._ens_chunks[:, :, 0]).sum(1) / weights.sum(1, keepdim=True)
            self._queue = torch.where(streams_dev[:, None, None], action[:, None], self._queue)
        else:
            new = chunk[:, : self.n_action_steps]
            self._queue = torch.where(streams_dev[:, None, None], new, self._queue)
        self._queue_pos = torch.where(streams, torch.zeros_like(self._queue_pos), self._queue_pos)

    def _pop_action(self) -> Tensor:
        index = self._queue_pos.to(self.device)
        action = self._queue[torch.arange(self.num_envs, device=self.device), index]
        self._queue_pos = self._queue_pos + 1
        return action

    def _push_window(self, tensors: dict[str, Tensor]) -> None:
        """Keep the last n_obs_steps observations per stream; a new episode is edge-padded with its first."""
        n_obs = self.config.n_obs_steps
        fresh = (self._window_len == 0).to(self.device)
        for key, value in tensors.items():
            if key not in self._window:
                self._window[key] = value[:, None].repeat(1, n_obs, *([1] * (value.dim() - 1)))
            shifted = torch.cat([self._window[key][:, 1:], value[:, None]], dim=1)
            padded = value[:, None].expand_as(shifted)
            mask = fresh.view(-1, *([1] * (shifted.dim() - 1)))
            self._window[key] = torch.where(mask, padded, shifted)
        self._window_len += 1

    def _check_obs(self, obs: Mapping[str, ObsValue]) -> tuple[bool, dict[str, Tensor]]:
        expected = self.config.input_shapes
        missing = sorted(set(expected) - set(obs))
        extra = sorted(set(obs) - set(expected))
        if missing or extra:
            raise ObservationError(
                f"observation keys {sorted(obs)} do not match the policy's {sorted(expected)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        batched_input = self.num_envs > 1
        tensors: dict[str, Tensor] = {}
        for key, shape in expected.items():
            value = obs[key]
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                raise ObservationError(
                    f"observation {key!r} has dtype {array.dtype}; expected a numeric array"
                )
            if (
                key in self._images
                and array.ndim >= 3
                and array.shape[-1] in (1, 3, 4)
                and array.shape[-3] != 3
            ):
                array = images_to_policy(array)  # HWC uint8 -> CHW float in [0, 1]
            want = tuple(shape)
            if array.shape == want and self.num_envs == 1:
                array = array[None]
            elif array.shape == (1, *want) and self.num_envs == 1:
                batched_input = True
            elif array.shape != (self.num_envs, *want):
                layout = (
                    f"{want}" if self.num_envs == 1 else f"({self.num_envs}, {', '.join(map(str, want))})"
                )
                hint = " (images: HWC uint8 or CHW float)" if key in self._images else ""
                raise ObservationError(
                    f"observation {key!r} has shape {tuple(np.shape(value))}; expected {layout}{hint}"
                )
            if not np.isfinite(array).all():
                raise ObservationError(
                    f"observation {key!r} contains NaN or inf; check the sensor feeding it"
                )
            tensors[key] = torch.as_tensor(array, dtype=torch.float32, device=self.device)
        return batched_input, tensors
