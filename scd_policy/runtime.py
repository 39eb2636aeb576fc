"""Deployment runtime: ``reset()`` and ``step(obs) -> action`` for every policy type.

The runtime knows policies only through their streaming protocol (``scd_policy.policies.base``): it
keeps the policy's opaque per-stream state (``policy.init_state``), hands it each tick's observation
(``policy.observe``) and asks for chunks for the streams that replan (``policy.sample``). It never looks
at a policy's class, so a new policy type plugs in without touching this module.

What a robot (or a simulation loop) calls at every control tick. For the causal policies (``scd`` and
``causal_diffusion``) each call runs the encoder once, on the new step only (KV cache, bounded to
``context_window`` steps with exact sliding-window eviction), with the action returned at the previous
tick fed back as that step's "previous action" token; a replan then runs K denoiser calls. For
``diffusion_policy`` (its natural streaming form) each replan re-encodes its window of the last
``n_obs_steps`` observations, edge-padded at an episode start as in training.

Execution modes:

- open loop (default): a chunk is sampled and its first ``n_action_steps`` actions are executed one per
  tick before that stream replans;
- ``replan_every_step=True``: a new chunk at every tick, smoothed with ACT-style temporal ensembling over
  the overlapping chunks (``TemporalEnsembler``), cheap for SCD because the history is never re-encoded.

Batched form: ``num_envs`` parallel streams, observations with a leading ``num_envs`` axis (omit it when
``num_envs == 1``); ``reset(mask)`` restarts the chosen streams only. Replans are per stream: only the
streams whose queue ran out are sampled, each from its own noise generator, so what one stream does
(a reset, a replan) never changes another stream's actions.

Randomness: stream i draws its noise from ``stream_generator(seed, i)`` (a CPU generator, so a seed gives
the same noise on every device); each replan draws one (H, Da) start noise from it (and, for the
ancestral DDPM sampler, its per-step noises), exactly as ``policy.predict_chunk(history,
generator=stream_generator(seed, i))`` would. ``reset()`` keeps the generators running (successive
episodes see fresh noise); ``reset(seed=s)`` re-seeds them, like ``gymnasium.Env.reset(seed=...)``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from scd_policy.backends import attach_backend
from scd_policy.conventions import is_policy_image
from scd_policy.diffusion import resolve_num_steps
from scd_policy.execution import ChunkQueue, EnsembledChunks, TemporalEnsembler
from scd_policy.policies import CheckpointError, Policy, load_policy, policy_class

__all__ = [
    "CheckpointError",
    "ObservationError",
    "PolicyOutputError",
    "PolicyRuntime",
    "SCDPolicy",
    "TemporalEnsembler",
    "TickResult",
    "plan_sessions",
    "step_sessions",
    "step_sessions_deferred",
    "stream_generator",
]

ObsValue = Tensor | npt.ArrayLike

# How far a CHW float image may stray outside [0, 1] before it is taken for a 0..255 image.
_IMAGE_RANGE_TOLERANCE = 1e-3


# A state value this many training ranges away from the data the policy was fitted on is a broken
# sensor or a unit mix-up, not an observation: beyond ~1e19 float32 layer norms overflow to NaN, and
# long before that the action means nothing. Refused before it reaches the stream's history.
MAX_NORMALIZED_MAGNITUDE = 1e6


class ObservationError(ValueError):
    """An observation passed to ``step`` has a missing/extra key, a wrong shape or dtype, NaN/inf, or
    values absurdly far outside the range the policy was trained on."""


class PolicyOutputError(RuntimeError):
    """The policy produced a non-finite action; the affected streams were reset (history cleared)."""


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """The noise generator of stream ``stream`` under runtime seed ``seed`` (CPU, independent streams).

    Streams of one seed, and the same stream under different seeds, get unrelated generators
    (``numpy.random.SeedSequence`` mixing, not ``seed + stream``, so seed 1 stream 0 != seed 0 stream 1).
    """
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be >= 0, got seed={seed}, stream={stream}")
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class PolicyRuntime:
    """The streaming policy API for any trained policy (scd, causal_diffusion, diffusion_policy).

    Example::

        policy = PolicyRuntime.from_pretrained("runs/push_t/best")
        policy.reset()
        action = policy.step({"state": state})  # raw units in, raw units out

    Arguments: ``num_envs`` parallel streams; ``n_action_steps`` actions executed per chunk (default:
    the policy's); ``num_inference_steps`` K (default: the policy's); ``replan_every_step`` with
    ``ensemble_decay`` (see ``TemporalEnsembler``); ``seed`` of the per-stream noise generators (None:
    fresh entropy); ``num_threads`` for torch's CPU ops (process-wide); ``compile`` the denoiser with
    ``torch.compile`` (see ``Policy.compile_denoiser``; the first steps then include compilation);
    ``latency_window`` the number of recent per-step latencies kept in ``latencies_ms``;
    ``context_window`` the steps a causal policy attends to (default: its ``config.context_window``);
    ``latency_ticks`` the latency budget in ticks (a chunk planned at tick t is used from tick t + d on,
    the current one executed meanwhile) and ``seam`` / ``blend_ticks`` how the next chunk takes over
    (``scd_policy.execution``). ``defer_encoding`` (open loop, causal policies): a tick at which no
    stream replans only tokenizes its step, and the next replanning tick encodes the buffered steps in
    one encoder call (the same cache and actions, to float32 rounding; a lower mean cost per tick, a
    little more at the replanning ticks; see ``Policy.observe``).
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
        compile: bool = False,
        latency_window: int = 10_000,
        context_window: int | None = None,
        latency_ticks: int = 0,
        seam: str = "switch",
        blend_ticks: int = 4,
        defer_encoding: bool = False,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if latency_window < 1:
            raise ValueError(f"latency_window must be >= 1, got {latency_window}")
        cfg = policy.config
        # The part of a chunk at or after the current tick (diffusion_policy's chunk starts in the past).
        self.chunk_len = cfg.horizon + cfg.chunk_start_offset
        n_action_steps = n_action_steps or cfg.n_action_steps
        if not 1 <= n_action_steps <= self.chunk_len:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be in [1, {self.chunk_len}] for this policy"
            )
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.policy = policy.eval()
        self.config = cfg
        self.num_envs = num_envs
        self.n_action_steps = 1 if replan_every_step else n_action_steps
        self.num_inference_steps = resolve_num_steps(cfg.diffusion, num_inference_steps)  # K, resolved
        self.replan_every_step = replan_every_step
        self.defer_encoding = defer_encoding
        self.device = next(policy.parameters()).device
        self.dtype = next(policy.parameters()).dtype
        self.seed = seed
        self.latencies_ms: deque[float] = deque(maxlen=latency_window)
        self.steps_taken = 0  # control ticks since construction (all episodes)
        self._images = {key for key, shape in cfg.input_shapes.items() if is_policy_image(shape)}
        # The vector observations' checks run in numpy on the small host arrays (a few microseconds,
        # where the same checks as tensor ops cost tens per tick); None: the tensor path (other dtypes).
        numpy_dtypes: dict[torch.dtype, type[np.floating[Any]]] = {
            torch.float32: np.float32,
            torch.float64: np.float64,
        }
        self._np_dtype = numpy_dtypes.get(self.dtype)
        self._np_stats = {
            key: (
                policy.normalizer.stats_arrays(key)
                if key not in self._images and self._np_dtype is not None
                else None
            )
            for key in cfg.input_shapes
        }
        self._action_dim = cfg.action_dim
        # Ancestral DDPM draws noise at every denoising step: those streams are sampled one at a time so
        # that each stream's draws come from its own generator only.
        self._per_stream_sampling = cfg.diffusion.process == "ddpm" and cfg.diffusion.sampler == "ddpm"
        # The policy's own per-stream history (opaque here).
        self._state = policy.init_state(num_envs, context_window=context_window)
        self.latency_ticks = latency_ticks
        self._executor: ChunkQueue | EnsembledChunks
        if replan_every_step:
            self._executor = EnsembledChunks(
                num_envs,
                self.chunk_len,
                self._action_dim,
                ensemble_decay,
                self.device,
                self.dtype,
                latency_ticks,
            )
        else:
            self._executor = ChunkQueue(
                num_envs,
                self.chunk_len,
                n_action_steps,
                self._action_dim,
                self.device,
                self.dtype,
                latency_ticks,
                seam,
                blend_ticks,
            )
        self._generators = [torch.Generator() for _ in range(num_envs)]
        self._seed_streams(range(num_envs), seed)
        if compile:
            policy.compile_denoiser()
        self.reset()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        policy_type: str | None = None,
        backend: str = "torch",
        **kwargs: Any,
    ) -> PolicyRuntime:
        """Load a policy folder (``model.safetensors`` + ``config.json``) written by training.

        ``policy_type`` (e.g. ``"scd"``) refuses a folder holding another type; a folder of another
        format version, an incomplete or corrupt one raises ``CheckpointError`` too. ``backend``: what
        runs the network (``"torch"``; ``"onnx"`` or ``"compile"`` for scd, see
        ``scd_policy.backends``; an ONNX export is kept in ``<path>/onnx`` and reused). ``kwargs`` go to
        the constructor (``num_threads`` is applied before the backend is set up).
        """
        if policy_type is None:
            policy = load_policy(path, device=device)
        else:
            policy = policy_class(policy_type).from_pretrained(path, device=device)
        if kwargs.get("num_threads") is not None:
            torch.set_num_threads(kwargs["num_threads"])
        return cls(attach_backend(policy, backend, checkpoint=path), **kwargs)

    # ------------------------------------------------------------------ state

    @torch.inference_mode()  # the state tensors are inference tensors: create and update them in this mode
    def reset(
        self, mask: Sequence[bool] | npt.NDArray[np.bool_] | Tensor | None = None, seed: int | None = None
    ) -> None:
        """Start new episodes: every stream (``mask`` None) or the streams where ``mask`` (num_envs,) is
        True. Clears their KV cache, action queue, previous action, observation window and ensembling
        state. ``seed`` also re-seeds their noise generators (``stream_generator(seed, i)``)."""
        n, da = self.num_envs, self._action_dim
        if mask is None:
            streams = torch.ones(n, dtype=torch.bool)
            self._prev_action = torch.zeros(n, da, device=self.device, dtype=self.dtype)
            self._prev_valid = torch.zeros(n, dtype=torch.bool, device=self.device)
            self._executor.reset()
            self._state.reset()
        else:
            if isinstance(mask, Tensor):
                streams = mask.detach().to("cpu", torch.bool)
            else:
                streams = torch.as_tensor(np.asarray(mask, dtype=bool))
            if streams.shape != (n,):
                raise ValueError(f"reset mask has shape {tuple(streams.shape)}; expected ({n},)")
            self._prev_valid[streams.to(self.device)] = False
            self._executor.reset(streams)
            self._state.reset(streams.to(self.device))
        if seed is not None:
            self._seed_streams(streams.nonzero().flatten().tolist(), seed)

    def _seed_streams(self, streams: Sequence[int] | range, seed: int | None) -> None:
        for stream in streams:
            if seed is None:  # fresh entropy, still one independent generator per stream
                state = np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0]
                self._generators[stream] = torch.Generator().manual_seed(int(state))
            else:
                self._generators[stream] = stream_generator(seed, stream)

    @property
    def generators(self) -> list[torch.Generator]:
        """The per-stream noise generators (CPU); ``get_state``/``set_state`` to snapshot or replay."""
        return self._generators

    # ------------------------------------------------------------------ the control tick

    @torch.inference_mode()
    def step(self, obs: Mapping[str, ObsValue]) -> npt.NDArray[np.float32]:
        """One control tick: observation(s) in raw units -> action(s) in raw units.

        ``obs[key]``: (*shape) when ``num_envs == 1`` (a leading axis of 1 is accepted too), else
        (num_envs, *shape); numpy arrays, array-likes or tensors. Images: HWC with values 0..255 (as
        environments render them) or CHW, uint8 0..255 or float in [0, 1]. Raises ``ObservationError``
        naming the key and the expected shape on any bad input. Returns (Da,) for an unbatched
        observation, else (num_envs, Da).
        """
        start = time.perf_counter()
        batched_input, tensors = self._check_obs(obs)
        # A tick at which no stream plans may leave its step's encoding to the next one that does.
        defer = self.defer_encoding and self._needs_chunk().numel() == 0
        self.policy.observe(self._state, tensors, self._prev_action, self._prev_valid, defer=defer)
        self._replan()
        return self._emit(start, batched_input)

    def _emit(self, start: float, batched_input: bool) -> npt.NDArray[np.float32]:
        """The tick's actions from the queues: checked, fed back as the next previous actions, timed."""
        action = self._pop_action()
        bad = ~torch.isfinite(action).all(dim=1)
        if bool(bad.any()):
            # Never fed back as a previous action, never left in a queue or a KV cache: those streams
            # start afresh, and the caller hears of it.
            streams = bad.cpu()
            self.reset(streams)
            raise PolicyOutputError(
                f"the policy produced NaN/inf actions for stream(s) {streams.nonzero().flatten().tolist()}; "
                "they were reset (history cleared). Check the observations fed to them; step() again "
                "starts a new episode for those streams"
            )
        self._prev_action = action
        self._prev_valid.fill_(True)
        out = action.detach().to("cpu", torch.float32).numpy()
        self.steps_taken += 1
        self.latencies_ms.append(1000.0 * (time.perf_counter() - start))
        return out if batched_input else out[0]

    def state_nbytes(self) -> int:
        """Bytes held by the per-stream history state (the causal policies' KV cache; ~0 otherwise)."""
        return self._state.nbytes()

    def latency_stats(self, warmup: int = 5) -> dict[str, float]:
        """Per-step latency in ms (p50, p90, p99, mean, max) over the kept steps, skipping the first
        ``warmup`` control ticks of this runtime (compilation, allocator warm-up)."""
        dropped = self.steps_taken - len(self.latencies_ms)  # older than latency_window
        values = np.array(list(self.latencies_ms)[max(warmup - dropped, 0) :])
        if values.size == 0:
            nan = float("nan")
            return {"p50_ms": nan, "p90_ms": nan, "p99_ms": nan, "mean_ms": nan, "max_ms": nan, "steps": 0.0}
        return {
            "p50_ms": float(np.percentile(values, 50)),
            "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)),
            "mean_ms": float(values.mean()),
            "max_ms": float(values.max()),
            "steps": float(values.size),
        }

    # ------------------------------------------------------------------ sampling

    def _replan(self) -> None:
        """Sample new chunks for the streams whose queue is used up, and only for those."""
        needed = self._needs_chunk()  # (R,) on CPU
        for rows, prefix in self._planning_groups(needed):
            if self._per_stream_sampling:
                chunk = torch.cat(
                    [
                        self._sample(rows[i : i + 1], None, self._generators[int(r)], _row(prefix, i))
                        for i, r in enumerate(rows)
                    ]
                )
            else:
                # Start noise drawn stream by stream from each stream's generator, then one batched call.
                chunk = self._sample(rows, self._start_noise(rows), None, prefix)
            self._store_chunk(rows, chunk)

    def _planning_groups(self, rows: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """The streams ``rows`` that plan now, split into those sampled freely (an episode's first chunk,
        or no inpainting) and those whose chunk starts with given actions (``seam="inpaint"``)."""
        if rows.numel() == 0:
            return []
        executor = self._executor
        if not isinstance(executor, ChunkQueue) or executor.prefix_length == 0:
            return [(rows, None)]
        first = executor.is_first(rows)
        groups: list[tuple[Tensor, Tensor | None]] = []
        if bool(first.any()):
            groups.append((rows[first], None))
        if bool((~first).any()):
            later = rows[~first]
            groups.append((later, executor.prefix(later)))
        return groups

    def _needs_chunk(self) -> Tensor:
        """The streams (CPU indices) that plan a chunk this tick."""
        return self._executor.needs_chunk()

    def _can_defer_planning(self) -> bool:
        """Whether the chunk planned this tick is only used in a later tick (an open-loop latency
        budget, and not an episode's first chunk)."""
        executor = self._executor
        return isinstance(executor, ChunkQueue) and executor.d > 0 and bool((executor.index >= 0).all())

    def _start_noise(self, rows: Tensor) -> Tensor:
        """One (H, Da) start noise per stream of ``rows``, each from that stream's own generator."""
        shape = (1, self.config.horizon, self._action_dim)
        noise = torch.cat(
            [torch.randn(shape, generator=self._generators[r], dtype=self.dtype) for r in rows.tolist()]
        )
        return noise.to(self.device)

    def _store_chunk(self, rows: Tensor, chunk: Tensor) -> None:
        """Hand the new chunks (R, H', Da) of the streams ``rows`` (R,), planned this tick, to the
        executor."""
        # The chunk from the current tick on (diffusion_policy's chunk starts n_obs_steps - 1 ticks back).
        self._executor.store(rows, chunk[:, chunk.shape[1] - self.chunk_len :])  # (R, chunk_len, Da)

    def _sample(
        self,
        rows: Tensor,
        noise: Tensor | None,
        generator: torch.Generator | None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        return self.policy.sample(
            self._state,
            rows,
            num_inference_steps=self.num_inference_steps,
            generator=generator,
            noise=noise,
            prefix=prefix,
        )

    # ------------------------------------------------------------------ internals

    def _pop_action(self) -> Tensor:
        return self._executor.pop()  # (N, Da)

    def _expected(self, key: str) -> str:
        want = tuple(self.config.input_shapes[key])
        layout = f"{want}" if self.num_envs == 1 else f"({self.num_envs}, {', '.join(map(str, want))})"
        if key in self._images:
            c, h, w = want
            hwc = f"({h}, {w}, {c})" if self.num_envs == 1 else f"({self.num_envs}, {h}, {w}, {c})"
            layout += f" (CHW) or {hwc} (HWC)"
        return layout

    def _check_obs(self, obs: Mapping[str, ObsValue]) -> tuple[bool, dict[str, Tensor]]:
        if not isinstance(obs, Mapping):
            raise ObservationError(
                f"step() takes a dict of observations {sorted(self.config.input_shapes)}; "
                f"got {type(obs).__name__}"
            )
        expected = self.config.input_shapes
        missing = sorted(set(expected) - set(obs))
        extra = sorted(set(obs) - set(expected))
        if missing or extra:
            raise ObservationError(
                f"observation keys {sorted(obs)} do not match the policy's {sorted(expected)}"
                + "".join(f"; missing {key!r}: expected shape {self._expected(key)}" for key in missing)
                + (f"; unexpected {extra}" if extra else "")
            )
        batched_input = self.num_envs > 1
        tensors: dict[str, Tensor] = {}
        for key, shape in expected.items():
            value = obs[key]
            try:
                array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            except (TypeError, ValueError) as error:  # ragged lists and the like
                raise ObservationError(
                    f"observation {key!r} is not an array ({error}); expected shape {self._expected(key)}"
                ) from error
            kind = array.dtype.kind
            if kind not in "biuf":  # bool, int, uint, float; not complex, str, object, datetime
                raise ObservationError(
                    f"observation {key!r} has dtype {array.dtype}; expected a real numeric array of shape "
                    f"{self._expected(key)}"
                )
            want, given = tuple(shape), array.shape
            step_shape, lead = array.shape[array.ndim - len(want) :], array.shape[: array.ndim - len(want)]
            from_255 = kind in "biu"  # integer images hold 0..255
            if key in self._images and step_shape != want and step_shape == (*want[1:], want[0]):
                array = np.moveaxis(array, -1, -3)  # HWC (as rendered and stored): 0..255 whatever the dtype
                step_shape, from_255 = want, True
            if array.ndim < len(want) or step_shape != want or lead not in self._leads():
                raise ObservationError(
                    f"observation {key!r} has shape {given}; expected {self._expected(key)}"
                )
            if lead == (1,) and self.num_envs == 1:
                batched_input = True
            if key in self._images:
                array = self._unit_range(key, array, from_255)
            stats = self._np_stats[key]
            if stats is not None and self._np_dtype is not None:
                tensors[key] = self._checked_vector(key, array.reshape(self.num_envs, *want), stats)
                continue
            tensor = torch.as_tensor(
                array.reshape(self.num_envs, *want), dtype=self.dtype, device=self.device
            )
            # Checked after the cast: a finite float64 beyond float32's range (1e39) becomes inf here.
            if not bool(torch.isfinite(tensor).all()):
                raise self._non_finite(key)
            if key not in self._images:
                self._check_range(key, tensor)
            tensors[key] = tensor
        return batched_input, tensors

    def _checked_vector(
        self, key: str, array: npt.NDArray[Any], stats: tuple[npt.NDArray[Any], npt.NDArray[Any]]
    ) -> Tensor:
        """A vector observation (num_envs, *shape) cast to the policy's dtype and checked in numpy: the
        same checks, messages and thresholds as the tensor path (``_check_range``)."""
        # A copy: the caller may reuse its array (a simulator's state view) after step() returns.
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
            values = np.array(array, dtype=self._np_dtype, order="C", copy=True)
        if not np.isfinite(values).all():
            raise self._non_finite(key)
        offset, scale = stats
        magnitude = float(np.abs((values - offset) / scale).max())
        if magnitude > MAX_NORMALIZED_MAGNITUDE:
            raise self._out_of_range(key, magnitude, float(np.abs(values).max()))
        return torch.from_numpy(values).to(self.device)

    def _check_range(self, key: str, tensor: Tensor) -> None:
        magnitude = float(self.policy.normalizer.normalize(key, tensor).abs().max())
        if magnitude > MAX_NORMALIZED_MAGNITUDE:
            raise self._out_of_range(key, magnitude, float(tensor.abs().max()))

    def _non_finite(self, key: str) -> ObservationError:
        return ObservationError(
            f"observation {key!r} contains NaN or inf (as {self.dtype}: values beyond ±3.4e38 "
            "overflow); check the sensor feeding it"
        )

    def _out_of_range(self, key: str, magnitude: float, max_abs: float) -> ObservationError:
        return ObservationError(
            f"observation {key!r} has values {magnitude:.3g} training ranges away from the data the "
            f"policy was trained on (max |value| {max_abs:.3g}); a broken sensor or a unit mix-up? "
            "Refused before it reaches the policy's history"
        )

    def _leads(self) -> tuple[tuple[int, ...], ...]:
        """Accepted leading axes: none or 1 for a single stream, (num_envs,) otherwise."""
        return ((), (1,)) if self.num_envs == 1 else ((self.num_envs,),)

    def _unit_range(self, key: str, array: npt.NDArray[Any], from_255: bool) -> npt.NDArray[np.float32]:
        """An image as float32 in [0, 1], the policy's convention (its normaliser maps that to [-1, 1])."""
        if from_255:
            return array.astype(np.float32) / np.float32(255.0)
        low, high = float(array.min()), float(array.max())
        if low < -_IMAGE_RANGE_TOLERANCE or high > 1.0 + _IMAGE_RANGE_TOLERANCE:
            raise ObservationError(
                f"observation {key!r} is a float CHW image with values in [{low:g}, {high:g}]; expected "
                "[0, 1] (pass 0..255 images as uint8, or in HWC layout)"
            )
        return array.astype(np.float32, copy=False)


TickResult = npt.NDArray[np.float32] | ObservationError | PolicyOutputError


@torch.inference_mode()
def step_sessions(
    runtimes: Sequence[PolicyRuntime], observations: Sequence[Mapping[str, ObsValue]]
) -> list[TickResult]:
    """One control tick of several single-stream runtimes that share one policy (a server's sessions),
    in one batched encoder call and one batched decoder run (``Policy.observe_many`` / ``sample_many``).

    Runtime i gets observations[i] and ends as its own ``step`` would leave it: same queue, previous
    action and generator state, the same action up to floating-point summation order (bit for bit when
    only one runtime ticks). Runtimes with ``defer_encoding`` that plan nothing this tick only buffer
    their step, and a replanning tick encodes each session's buffered steps with the batch. Returns,
    per runtime, its action (Da,) or the error its own ``step`` would have raised, so that one
    session's bad observation never fails another's tick.
    """
    results, deferred = step_sessions_deferred(runtimes, observations)
    plan_sessions(deferred)
    return results


@torch.inference_mode()
def step_sessions_deferred(
    runtimes: Sequence[PolicyRuntime], observations: Sequence[Mapping[str, ObsValue]]
) -> tuple[list[TickResult], list[PolicyRuntime]]:
    """``step_sessions`` with the planning that this tick's actions do not need left for later: the
    runtimes returned plan a chunk that their latency budget (``latency_ticks`` > 0) only uses in a
    later tick. Call ``plan_sessions`` on them before their next tick (a server does it after sending
    the replies, so the K decoder calls overlap the robot's motion); the actions are the same."""
    if len(runtimes) != len(observations):
        raise ValueError(f"{len(runtimes)} runtimes but {len(observations)} observations")
    start = time.perf_counter()
    results: list[TickResult | None] = [None] * len(runtimes)
    live: list[tuple[int, PolicyRuntime, bool, dict[str, Tensor]]] = []
    for index, (runtime, obs) in enumerate(zip(runtimes, observations, strict=True)):
        if runtime.num_envs != 1 or runtime.policy is not runtimes[0].policy:
            raise ValueError("step_sessions batches single-stream runtimes (num_envs=1) of one policy")
        if runtime.num_inference_steps != runtimes[0].num_inference_steps:
            raise ValueError("step_sessions needs one num_inference_steps for every runtime")
        try:
            batched_input, tensors = runtime._check_obs(obs)
        except ObservationError as error:
            results[index] = error
            continue
        live.append((index, runtime, batched_input, tensors))
    deferred: list[PolicyRuntime] = []
    if live:
        policy = live[0][1].policy
        planning = [runtime for _, runtime, _, _ in live if runtime._needs_chunk().numel()]
        # Sessions that plan nothing this tick and defer encoding only buffer their step (as their own
        # step() would); the others are encoded now.
        waits = [runtime.defer_encoding and runtime not in planning for _, runtime, _, _ in live]
        waiting = [entry for entry, wait in zip(live, waits, strict=True) if wait]
        encoding = [entry for entry, wait in zip(live, waits, strict=True) if not wait]
        for group, defer in ((waiting, True), (encoding, False)):
            if group:
                policy.observe_many(
                    [runtime._state for _, runtime, _, _ in group],
                    {key: torch.cat([tensors[key] for *_, tensors in group]) for key in group[0][3]},
                    torch.cat([runtime._prev_action for _, runtime, _, _ in group]),
                    torch.cat([runtime._prev_valid for _, runtime, _, _ in group]),
                    defer=defer,
                )
        deferred = [runtime for runtime in planning if runtime._can_defer_planning()]
        plan_sessions([runtime for runtime in planning if runtime not in deferred])
        for index, runtime, batched_input, _ in live:
            try:
                results[index] = runtime._emit(start, batched_input)
            except PolicyOutputError as error:
                results[index] = error
                if runtime in deferred:  # it was reset: nothing to plan from
                    deferred.remove(runtime)
    return [result for result in results if result is not None], deferred


@torch.inference_mode()
def plan_sessions(runtimes: Sequence[PolicyRuntime]) -> None:
    """Sample, in one batched decoder run, the chunks that the single-stream ``runtimes`` (one policy,
    each already observed this tick) plan now, and hand them to their executors."""
    first = torch.zeros(1, dtype=torch.long)
    # Sessions sampled freely and sessions whose chunk starts with given actions: one run each.
    groups: dict[bool, list[tuple[PolicyRuntime, Tensor | None]]] = {False: [], True: []}
    for runtime in runtimes:
        ((_, prefix),) = runtime._planning_groups(first)
        groups[prefix is not None].append((runtime, prefix))
    for members in groups.values():
        if not members:
            continue
        if members[0][0]._per_stream_sampling:
            for runtime, prefix in members:
                runtime._store_chunk(first, runtime._sample(first, None, runtime._generators[0], prefix))
            continue
        prefixes = [prefix for _, prefix in members if prefix is not None]
        chunks = members[0][0].policy.sample_many(
            [runtime._state for runtime, _ in members],
            noise=torch.cat([runtime._start_noise(first) for runtime, _ in members]),
            num_inference_steps=members[0][0].num_inference_steps,
            prefix=torch.cat(prefixes) if prefixes else None,
        )
        for row, (runtime, _) in enumerate(members):
            runtime._store_chunk(first, chunks[row : row + 1])


def _row(prefix: Tensor | None, i: int) -> Tensor | None:
    return None if prefix is None else prefix[i : i + 1]


# The name earlier releases gave the runtime (``from scd_policy import SCDPolicy`` keeps working).
SCDPolicy = PolicyRuntime
