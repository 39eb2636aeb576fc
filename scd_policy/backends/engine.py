"""Step engines: what runs SCD's encoder step and decoder call when the backend is not plain torch.

A ``StepEngine`` takes over two calls of ``SeparableCausalDiffusionPolicy`` and nothing else:

- ``encode(tokens, cache)``: the encoder over T new steps. The cache is driven exactly as the torch path
  drives it (``begin`` -> every layer's new keys/values through ``extend`` -> ``commit``), so eviction,
  sliding windows, per-stream resets and ``StackedCache`` batching keep their semantics; only the
  layers' arithmetic runs elsewhere, in one call (``step_graphs.EncoderStepGraph``).
- ``denoise(x_t, blocks, final, context)``: one decoder call at a prepared noise level
  (``step_graphs.DecoderStepGraph``). The sampler (flow, DDPM, inpainting, shortcut step sizes) stays the
  library's own, in ``scd_policy.diffusion``.

Engines here: ``TorchGraphEngine`` (the graphs in eager torch, or through ``torch.compile``); the ONNX
Runtime engine is in ``backends.onnx``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from scd_policy.backends.step_graphs import DecoderStepGraph, EncoderStepGraph
from scd_policy.models.kv_cache import StepCache, StepPlan

if TYPE_CHECKING:
    from scd_policy.policies.scd import SeparableCausalDiffusionPolicy


class StepEngine(ABC):
    """Runs SCD's encoder step and decoder call (see the module docstring); one per policy."""

    def __init__(self, policy: SeparableCausalDiffusionPolicy) -> None:
        encoder = policy.encoder
        self.n_layers = len(encoder.blocks)
        self.n_heads = encoder.n_heads
        self.head_dim = encoder.head_dim
        self.n_context_tokens = encoder.n_context_tokens
        self._decoder_module = policy.decoder
        self._levels: dict[tuple[tuple[float, ...], float | None], list[tuple[Any, Any]]] = {}

    def levels(self, times: Tensor, step_size: float | None) -> list[tuple[Any, Any]]:
        """The decoder's inputs ``(blocks, final)`` at each of the K noise levels ``times``
        (``decoder.prepare(times, step_size)``, step k), in the form ``denoise`` takes
        (``level_input``), made once per distinct set of sampling times: the weights behind an engine
        are frozen, and a runtime samples at the same K times every replan."""
        key = (tuple(times.tolist()), step_size)
        levels = self._levels.get(key)
        if levels is None:
            with torch.no_grad():
                shared = self._decoder_module.prepare(times, step_size)
            levels = self._levels[key] = [
                (self.level_input(shared.blocks[k]), self.level_input(shared.final[k]))
                for k in range(len(times))
            ]
        return levels

    def level_input(self, tensor: Tensor) -> Any:
        """A prepared noise-level tensor as ``denoise`` takes it (torch engines: the tensor itself)."""
        return tensor

    def denoiser(
        self, times: Tensor, step_size: float | None, context: Tensor
    ) -> Callable[[Tensor, int], Tensor]:
        """The decoder at the K prepared noise levels ``times`` on ``context`` (N, n_ctx, D): the step
        function ``(x_t, k) -> prediction`` of one sampling run (``diffusion.StepFn``)."""
        levels = self.levels(times, step_size)

        def step(x: Tensor, k: int) -> Tensor:
            blocks, final = levels[k]
            return self.denoise(x, blocks, final, context)

        return step

    @abstractmethod
    def run_encoder(self, inputs: list[Tensor]) -> list[Tensor]:
        """``EncoderStepGraph``'s forward on its inputs, in their order."""

    @abstractmethod
    def denoise(self, x_t: Tensor, blocks: Tensor, final: Tensor, context: Tensor) -> Tensor:
        """``DecoderStepGraph``'s forward: x_t (N, H, Da) -> prediction (N, H, Da)."""

    def encode(self, tokens: Tensor, cache: StepCache) -> Tensor:
        """tokens (B, T, S, D) of T new steps -> their contexts (B, T, n_ctx, D); appends them to
        ``cache`` as ``CausalEncoder.forward`` would."""
        b, t, s, _ = tokens.shape
        per_step = s + self.n_context_tokens
        plan = cache.begin(t, per_step, b, self.head_dim, tokens.device)
        inputs = encoder_inputs(tokens, plan, cache.past(), self.n_layers, self.n_heads, self.head_dim)
        context, *new = self.run_encoder(inputs)
        for layer in range(self.n_layers):
            cache.extend(layer, new[2 * layer], new[2 * layer + 1])
        cache.commit(plan)
        return context


def encoder_inputs(
    tokens: Tensor,
    plan: StepPlan,
    past: list[tuple[Tensor, Tensor]] | None,
    n_layers: int,
    n_heads: int,
    head_dim: int,
) -> list[Tensor]:
    """The ``EncoderStepGraph`` inputs of one call, from the cache's plan and kept keys/values; every
    tensor contiguous and of the batch size B (what an exported graph takes)."""
    b = tokens.shape[0]
    n = plan.rope[0].shape[-2]  # new tokens
    cos, sin = (
        table.reshape(-1, 1, n, head_dim).expand(b, 1, n, head_dim).contiguous() for table in plan.rope
    )
    m = 0 if past is None else past[0][0].shape[2]  # kept tokens
    if plan.mask is None:  # every key visible (a streamed step): constant masks, made once per shape
        new_mask = _constant_mask(b, n, n, True, tokens.device)
        past_mask = _constant_mask(b, n, max(m, 1), past is not None, tokens.device)
    else:
        mask = plan.mask.expand(b, 1, n, m + n)
        new_mask = mask[..., m:].contiguous()
        past_mask = (
            mask[..., :m].contiguous() if past is not None else _constant_mask(b, n, 1, False, tokens.device)
        )
    if past is None:
        # An exported graph keeps every size >= 1: one zero token, hidden from every query.
        empty = tokens.new_zeros(b, n_heads, 1, head_dim)
        flat = [empty] * (2 * n_layers)
    else:
        flat = [tensor.contiguous() for pair in past for tensor in pair]
    return [tokens.contiguous(), cos, sin, past_mask, new_mask, *flat]


@functools.lru_cache(maxsize=256)
def _constant_mask(b: int, queries: int, keys: int, value: bool, device: torch.device) -> Tensor:
    """A (b, 1, queries, keys) bool mask of one value, shared and never written (graph inputs only)."""
    with torch.inference_mode(False):
        return torch.full((b, 1, queries, keys), value, dtype=torch.bool, device=device)


class TorchGraphEngine(StepEngine):
    """The step graphs in torch: eager (``compile=False``, the reference the exported graphs are tested
    against) or through ``torch.compile`` with dynamic shapes (the ``compile`` backend; the first calls
    of each new shape pay for compilation)."""

    def __init__(self, policy: SeparableCausalDiffusionPolicy, *, compile: bool = True) -> None:
        super().__init__(policy)
        self.encoder_graph = EncoderStepGraph(policy.encoder)
        self.decoder_graph = DecoderStepGraph(policy.decoder)
        self._encoder: Callable[..., tuple[Tensor, ...]] = self.encoder_graph
        self._decoder: Callable[..., Tensor] = self.decoder_graph
        if compile:
            # dynamic=True: the cached length grows every step until the window is full, and the
            # number of streams changes with the sessions; one graph for all of them instead of a
            # recompile per size.
            self._encoder = cast(
                Callable[..., tuple[Tensor, ...]], torch.compile(self.encoder_graph, dynamic=True)
            )
            self._decoder = cast(Callable[..., Tensor], torch.compile(self.decoder_graph, dynamic=True))

    def run_encoder(self, inputs: list[Tensor]) -> list[Tensor]:
        return list(self._encoder(*inputs))

    def denoise(self, x_t: Tensor, blocks: Tensor, final: Tensor, context: Tensor) -> Tensor:
        return self._decoder(x_t, blocks, final, context)
