"""ONNX export of SCD's run-time calls, and the engine that runs them with ONNX Runtime.

``export_onnx(policy, folder)`` writes ``encoder_step.onnx`` and ``decoder.onnx`` (the graphs of
``backends.step_graphs``, dynamic in streams, new steps and cached length) and ``manifest.json``, which
records the weights they were exported from. ``OnnxEngine(policy, folder)`` loads them, refusing files
exported from other weights; ``onnx_engine(policy, checkpoint)`` reuses ``<checkpoint>/onnx`` when it
matches the weights and exports it otherwise (once; ~10 s for ``base``).

Why it pays at batch 1 on a CPU: a control step is ~50 small matrix products on a handful of tokens,
where torch's per-op dispatch costs as much as the arithmetic; ONNX Runtime runs the whole graph in one
call with fused kernels (measured in ``docs/RESULTS.md``, "Latency near the limit").

Requires the ``onnx`` extra (``pip install 'scd-policy[onnx]'``: onnx, onnxscript for torch's exporter,
onnxruntime); without it these functions raise ``BackendError`` saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from scd_policy.backends.engine import StepEngine
from scd_policy.backends.errors import BackendError
from scd_policy.backends.step_graphs import (
    DECODER_INPUT_NAMES,
    DECODER_OUTPUT_NAMES,
    DecoderStepGraph,
    EncoderStepGraph,
    encoder_input_names,
    encoder_output_names,
)
from scd_policy.config import ConfigError
from scd_policy.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from scd_policy.policies.scd import SeparableCausalDiffusionPolicy

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_step.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"
EXPORT_FORMAT = "scd-policy-onnx"
EXPORT_VERSION = 1
EXPORT_FOLDER = "onnx"  # inside a policy folder
_INSTALL_HINT = "install the onnx extra: pip install 'scd-policy[onnx]' (onnx, onnxscript, onnxruntime)"


def require(module: str) -> ModuleType:
    """Import ``module`` or raise ``BackendError`` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise BackendError(
            f"backend 'onnx' needs the Python package {module!r} ({error}); {_INSTALL_HINT}"
        ) from None


def weights_fingerprint(policy: SeparableCausalDiffusionPolicy) -> str:
    """SHA-256 over the policy's tensors (names, shapes, bytes) and its config: what an export is of."""
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(policy.config), sort_keys=True, default=str).encode()
    )
    for name, tensor in sorted(policy.state_dict().items()):
        array = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}{tuple(array.shape)}{array.dtype}".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def export_onnx(policy: SeparableCausalDiffusionPolicy, folder: str | Path) -> Path:
    """Write the encoder-step and decoder graphs of ``policy`` (float32, CPU) and their manifest into
    ``folder``; returns it. The policy is left as it was (same device, mode and weights)."""
    require("onnx")
    require("onnxscript")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device, training = next(policy.parameters()).device, policy.training
    policy.to("cpu").eval()
    try:
        _export_encoder(policy, folder / ENCODER_FILE)
        _export_decoder(policy, folder / DECODER_FILE)
    finally:
        policy.to(device).train(training)
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "policy_type": policy.policy_type,
        "weights_fingerprint": weights_fingerprint(policy),
        "torch_version": torch.__version__,
        "n_layers": len(policy.encoder.blocks),
        "files": [ENCODER_FILE, DECODER_FILE],
    }
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")  # last: complete
    log.info(
        "exported %s and %s to %s in %.1f s", ENCODER_FILE, DECODER_FILE, folder, time.perf_counter() - start
    )
    return folder


def _example_encoder_inputs(policy: SeparableCausalDiffusionPolicy) -> list[Tensor]:
    # Sizes >= 2 everywhere that is dynamic: torch.export fixes any dimension it first sees at 0 or 1.
    encoder, config = policy.encoder, policy.config
    b, t, m = 2, 2, 3
    s = policy.tokenizer.tokens_per_step
    n = t * (s + encoder.n_context_tokens)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, t, s, config.d_model, generator=gen)
    cos, sin = (torch.randn(b, 1, n, encoder.head_dim, generator=gen) for _ in range(2))
    past_mask = torch.ones(b, 1, n, m, dtype=torch.bool)
    new_mask = torch.ones(b, 1, n, n, dtype=torch.bool)
    past = [
        torch.randn(b, encoder.n_heads, m, encoder.head_dim, generator=gen)
        for _ in range(2 * len(encoder.blocks))
    ]
    return [tokens, cos, sin, past_mask, new_mask, *past]


def _export_encoder(policy: SeparableCausalDiffusionPolicy, path: Path) -> None:
    from torch.export import Dim

    n_layers = len(policy.encoder.blocks)
    batch, steps, kept, new = (
        Dim("streams", min=1),
        Dim("new_steps", min=1),
        Dim("kept", min=1),
        Dim("new", min=1),
    )
    shapes: list[Any] = [
        {0: batch, 1: steps},  # tokens
        {0: batch, 2: new},  # cos
        {0: batch, 2: new},  # sin
        {0: batch, 2: new, 3: kept},  # past_mask
        {0: batch, 2: new, 3: new},  # new_mask
        tuple({0: batch, 2: kept} for _ in range(2 * n_layers)),  # *past: one entry for the varargs
    ]
    _export(
        EncoderStepGraph(policy.encoder),
        _example_encoder_inputs(policy),
        shapes,
        path,
        encoder_input_names(n_layers),
        encoder_output_names(n_layers),
    )


def _export_decoder(policy: SeparableCausalDiffusionPolicy, path: Path) -> None:
    from torch.export import Dim

    config = policy.config
    with torch.no_grad():
        prepared = policy.decoder.prepare(
            torch.tensor([1.0, 0.5]), 0.5 if config.diffusion.shortcut else None
        )
    rows = Dim("rows", min=1)
    x_t = torch.randn(2, config.horizon, config.action_dim)
    context = torch.randn(2, config.n_context_tokens, config.d_model)
    _export(
        DecoderStepGraph(policy.decoder),
        [x_t, prepared.blocks[0], prepared.final[0], context],
        [{0: rows}, {}, {}, {0: rows}],
        path,
        DECODER_INPUT_NAMES,
        DECODER_OUTPUT_NAMES,
    )


def _export(
    module: torch.nn.Module,
    inputs: list[Tensor],
    shapes: list[Any],
    path: Path,
    input_names: list[str],
    output_names: list[str],
) -> None:
    # The exporter narrates its passes on stdout and warns about axis names it merged; a user of the
    # library sees one log line instead (export_onnx), and a failure still raises with its message.
    quiet = logging.getLogger("onnx_ir")  # logs every pass of its optimiser at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                tuple(inputs),
                dynamic_shapes=tuple(shapes),
                input_names=input_names,
                output_names=output_names,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    if program is None:  # only the legacy exporter returns None
        raise BackendError("torch.onnx.export returned no program")
    # One self-contained file (these graphs are far below protobuf's 2 GB), written atomically.
    atomic_write_bytes(path, program.model_proto.SerializeToString())


class OnnxEngine(StepEngine):
    """The exported graphs run by ONNX Runtime's CPU provider (``threads`` intra-op threads: default
    torch's current thread count, so ``num_threads`` of a runtime applies to both)."""

    def __init__(
        self, policy: SeparableCausalDiffusionPolicy, folder: str | Path, *, threads: int | None = None
    ) -> None:
        super().__init__(policy)
        ort = require("onnxruntime")
        folder = Path(folder)
        check_manifest(folder, policy)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(str(folder / ENCODER_FILE), options, providers=providers)
        self._decoder = ort.InferenceSession(str(folder / DECODER_FILE), options, providers=providers)
        self._encoder_names = encoder_input_names(self.n_layers)

    def run_encoder(self, inputs: list[Tensor]) -> list[Tensor]:
        feed = {name: _array(tensor) for name, tensor in zip(self._encoder_names, inputs, strict=True)}
        return [torch.from_numpy(out) for out in self._encoder.run(None, feed)]

    def level_input(self, tensor: Tensor) -> np.ndarray[Any, Any]:
        return _array(tensor)  # converted once per set of sampling times, not per call

    def denoiser(
        self, times: Tensor, step_size: float | None, context: Tensor
    ) -> Callable[[Tensor, int], Tensor]:
        # The K calls of a run share their context (converted once here) and every run at the same
        # times its noise-level arrays (``levels``): each call converts only x_t, a per-call cost that
        # showed at the small presets, where one decoder call is ~0.1 ms.
        levels = self.levels(times, step_size)
        run, context_array = self._decoder.run, _array(context)
        x_name, blocks_name, final_name, context_name = DECODER_INPUT_NAMES

        def step(x: Tensor, k: int) -> Tensor:
            blocks, final = levels[k]
            feed = {x_name: _array(x), blocks_name: blocks, final_name: final, context_name: context_array}
            (out,) = run(None, feed)
            return torch.from_numpy(out)

        return step

    def denoise(self, x_t: Tensor, blocks: Tensor, final: Tensor, context: Tensor) -> Tensor:
        feed = {
            name: _array(tensor)
            for name, tensor in zip(DECODER_INPUT_NAMES, (x_t, blocks, final, context), strict=True)
        }
        (out,) = self._decoder.run(None, feed)
        return torch.from_numpy(out)


def _array(tensor: Tensor) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(tensor.detach().numpy())


def check_manifest(folder: Path, policy: SeparableCausalDiffusionPolicy) -> None:
    """Refuse (``BackendError`` naming the file and the fix) an export folder that is missing,
    incomplete, of another format, or exported from other weights."""
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(
            f"{path} is missing: {folder} is not a complete ONNX export (run scd-export)"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise BackendError(f"{path} is unreadable ({error}); re-run scd-export") from None
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("format_version") != EXPORT_VERSION:
        raise BackendError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; expected "
            f"{EXPORT_FORMAT!r} version {EXPORT_VERSION}; re-run scd-export"
        )
    missing = [name for name in (ENCODER_FILE, DECODER_FILE) if not (folder / name).is_file()]
    if missing:
        raise BackendError(f"{folder} lacks {missing}; re-run scd-export")
    if manifest.get("weights_fingerprint") != weights_fingerprint(policy):
        raise BackendError(
            f"{folder} was exported from other weights than the policy being loaded (weights_fingerprint "
            f"in {path} differs); re-run scd-export, or delete the folder to have it re-exported"
        )


def onnx_engine(
    policy: SeparableCausalDiffusionPolicy,
    checkpoint: str | Path | None = None,
    *,
    threads: int | None = None,
) -> OnnxEngine:
    """An ONNX Runtime engine for ``policy``: from ``<checkpoint>/onnx`` when that export matches the
    weights; otherwise exported there first (or into a temporary folder when ``checkpoint`` is None or
    not writable)."""
    require("onnxruntime")
    if checkpoint is not None:
        folder = Path(checkpoint) / EXPORT_FOLDER
        try:  # the engine checks the folder's manifest against the weights itself
            return OnnxEngine(policy, folder, threads=threads)
        except BackendError as reason:
            log.info("exporting the policy to %s (%s)", folder, reason)
        try:
            export_onnx(policy, folder)
            return OnnxEngine(policy, folder, threads=threads)
        except PermissionError:
            log.warning("%s is not writable: exporting into a temporary folder instead", folder)
    folder = Path(tempfile.mkdtemp(prefix="scd-onnx-"))
    export_onnx(policy, folder)
    return OnnxEngine(policy, folder, threads=threads)


# Exported actions may differ from torch's by float32 summation order, nothing more.
TOLERANCE = 1e-4


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a run folder, a checkpoints/step_* folder, or a policy folder
    out: str | None = None  # default: <policy folder>/onnx, where backend=onnx looks first
    check_steps: int = 50  # ticks of a random 2-stream episode compared against torch (0: no check)


def run_export(cfg: ExportConfig) -> Path:
    """``scd-export``'s work: export a policy folder's scd policy, check it streams torch's actions."""
    from scd_policy.backends.verify import stream_difference
    from scd_policy.policies import SeparableCausalDiffusionPolicy, load_policy
    from scd_policy.training.checkpoint import resolve_policy_dir

    if not cfg.checkpoint:
        raise ConfigError("scd-export needs checkpoint=<run folder or policy folder>")
    policy_dir = resolve_policy_dir(Path(cfg.checkpoint))
    policy = load_policy(policy_dir)
    if not isinstance(policy, SeparableCausalDiffusionPolicy):
        raise ConfigError(
            f"{policy_dir} holds a {policy.policy_type!r} policy; scd-export exports 'scd' policies"
        )
    out = Path(cfg.out) if cfg.out else policy_dir / EXPORT_FOLDER
    export_onnx(policy, out)
    if cfg.check_steps > 0:
        difference = stream_difference(policy, OnnxEngine(policy, out), steps=cfg.check_steps)
        if difference > TOLERANCE:
            raise ConfigError(
                f"the export in {out} streams actions {difference:.2g} away from torch's (tolerance "
                f"{TOLERANCE:g}); please report it with the policy's config.json"
            )
        log.info(
            "checked: %d streamed ticks, largest action difference to torch %.2g", cfg.check_steps, difference
        )
    log.info("run it with backend=onnx (scd-eval, scd-serve, PolicyRuntime.from_pretrained)")
    return out
