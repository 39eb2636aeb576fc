"""Inference backends (scd_policy.backends): the exported ONNX graphs, run by ONNX Runtime, and the
torch.compile'd graphs stream the actions torch streams, through the same KV cache, resets, window
eviction and cross-session batching; exports are kept, reused and refused when stale; missing runtimes
and unsupported policies get clear errors."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from scd_policy.backends import BackendError, attach_backend
from scd_policy.backends.engine import TorchGraphEngine
from scd_policy.backends.onnx import (
    EXPORT_FOLDER,
    MANIFEST_FILE,
    ExportConfig,
    OnnxEngine,
    export_onnx,
    onnx_engine,
    run_export,
)
from scd_policy.backends.verify import random_episode, stream_difference
from scd_policy.bench.setup import build_policy
from scd_policy.config import ConfigError, DiffusionConfig
from scd_policy.models.kv_cache import KVCache, StackedCache
from scd_policy.policies import SeparableCausalDiffusionPolicy, load_policy
from scd_policy.runtime import PolicyRuntime, step_sessions

GOLDEN = Path(__file__).resolve().parent / "golden"
# ONNX Runtime's kernels sum in another order than torch's: float32 rounding, nothing more.
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scd(**overrides: object) -> SeparableCausalDiffusionPolicy:
    policy = build_policy("scd", "tiny", 5, 3, False, "cpu", 0, overrides or None)
    assert isinstance(policy, SeparableCausalDiffusionPolicy)
    return policy


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden scd checkpoint (state + camera image, a 4-step window that evicts within 50 ticks),
    copied where an export may be written next to it, and loaded once with backend=onnx: which
    exports it into <folder>/onnx (asserted in test_from_pretrained_reuses_its_export)."""
    folder = tmp_path_factory.mktemp("golden") / "scd"
    shutil.copytree(GOLDEN / "scd", folder)
    assert not (folder / EXPORT_FOLDER).exists()
    PolicyRuntime.from_pretrained(folder, backend="onnx")
    return folder


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of ``scd()``'s weights."""
    return export_onnx(scd(), tmp_path_factory.mktemp("tiny") / EXPORT_FOLDER)


def test_the_step_graphs_are_the_torch_path() -> None:
    # The eager graphs compute the torch path's arithmetic: the same actions over a streamed episode
    # with a reset, up to the attention kernel (the graph always passes a mask; ~1 float32 ulp).
    policy = scd()
    for streams in (1, 3):
        assert stream_difference(policy, TorchGraphEngine(policy, compile=False), num_envs=streams) < 1e-6


@pytest.mark.parametrize(
    "variant",
    ["golden", "shortcut", "ddpm", "past_actions"],
)
def test_onnx_streams_the_actions_torch_streams(variant: str, golden: Path, tmp_path: Path) -> None:
    """50 ticks of 2 streams, replanning at every tick (so every tick runs the encoder and K decoder
    calls), stream 0 reset half-way: ONNX Runtime's actions equal torch's within 1e-4."""
    if variant == "golden":
        loaded = load_policy(golden)
        assert isinstance(loaded, SeparableCausalDiffusionPolicy)
        engine = OnnxEngine(loaded, golden / EXPORT_FOLDER)
        assert stream_difference(loaded, engine, steps=50, num_envs=2) < TOLERANCE
        return
    if variant == "shortcut":
        policy = scd(diffusion=DiffusionConfig(shortcut=True, num_inference_steps=2))
    elif variant == "ddpm":
        policy = scd(diffusion=DiffusionConfig(process="ddpm", sampler="ddim", num_inference_steps=5))
    else:
        policy = scd(past_actions=2)
    engine = OnnxEngine(policy, export_onnx(policy, tmp_path / "onnx"))
    assert stream_difference(policy, engine, steps=50, num_envs=2) < TOLERANCE
    assert policy.engine is None  # the comparison leaves the policy on torch


def test_onnx_serves_batched_sessions_like_torch(tmp_path: Path) -> None:
    # The server's path: one encoder call over separate single-stream caches (StackedCache, sessions
    # at different lengths, padded and masked) and one decoder run over their contexts.
    policy = scd(context_window=3)
    episode = random_episode(policy.config.input_shapes, 12, 4, seed=1)

    def serve() -> list[np.ndarray]:
        sessions = [PolicyRuntime(policy, seed=i, n_action_steps=1) for i in range(4)]
        out = []
        for tick, obs in enumerate(episode):
            ticking = sessions[: 1 + tick % 4]  # the later sessions join later: different lengths
            rows = [{key: value[i] for key, value in obs.items()} for i in range(len(ticking))]
            out.append(np.stack([np.asarray(a) for a in step_sessions(ticking, rows)]))
        return out

    reference = serve()
    attach_backend(policy, "onnx", checkpoint=tmp_path)
    for expected, got in zip(reference, serve(), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


def test_stacked_cache_hands_out_its_padded_past() -> None:
    caches = [KVCache(2, max_steps=3) for _ in range(2)]
    keys = torch.randn(1, 2, 4, 8)
    for layer in range(2):  # cache 0 holds one step of 4 tokens, cache 1 nothing
        caches[0].extend(layer, keys + layer, keys - layer)
    caches[0].commit(caches[0].begin(1, 4, 1, 8, torch.device("cpu")))
    stacked = StackedCache(caches)
    plan = stacked.begin(1, 4, 2, 8, torch.device("cpu"))
    assert plan.n_old_steps == 1  # counted in steps, as a KVCache's plan is
    past = stacked.past()
    assert past is not None and len(past) == 2
    for layer, (k, v) in enumerate(past):
        assert k.shape == (2, 2, 4, 8)
        torch.testing.assert_close(k[0:1], keys + layer, rtol=0, atol=0)
        torch.testing.assert_close(v[0:1], keys - layer, rtol=0, atol=0)
        assert not k[1].any()  # padding, which the plan's mask hides
    assert plan.mask is not None and not plan.mask[1, :, :, :4].any() and plan.mask[0].all()
    assert StackedCache([KVCache(2, 3)]).past() is None


def test_from_pretrained_reuses_its_export(golden: Path) -> None:
    # The fixture's from_pretrained(backend="onnx") exported the folder; loading again reuses it.
    encoder_file = golden / EXPORT_FOLDER / "encoder_step.onnx"
    written = encoder_file.stat().st_mtime_ns
    runtime = PolicyRuntime.from_pretrained(golden, backend="onnx", n_action_steps=1)
    assert encoder_file.stat().st_mtime_ns == written
    torch_runtime = PolicyRuntime.from_pretrained(golden, n_action_steps=1)
    for obs in random_episode(runtime.config.input_shapes, 8, 1, seed=2):
        single = {key: value[0] for key, value in obs.items()}
        np.testing.assert_allclose(runtime.step(single), torch_runtime.step(single), rtol=0, atol=TOLERANCE)


def test_an_export_of_other_weights_is_refused_and_replaced(tiny_export: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_export, tmp_path / EXPORT_FOLDER)
    policy = scd()
    OnnxEngine(policy, tmp_path / EXPORT_FOLDER)  # the same weights: accepted
    with torch.no_grad():
        policy.decoder.final.linear.bias.add_(1.0)  # the weights move on (more training)
    with pytest.raises(BackendError, match="exported from other weights"):
        OnnxEngine(policy, tmp_path / EXPORT_FOLDER)
    engine = onnx_engine(policy, tmp_path)  # backend=onnx re-exports a stale folder
    assert stream_difference(policy, engine, steps=6) < TOLERANCE


@pytest.mark.parametrize("damage", ["no_manifest", "no_decoder", "other_format"])
def test_an_incomplete_export_is_refused_with_the_fix(damage: str, tiny_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / EXPORT_FOLDER
    shutil.copytree(tiny_export, folder)
    if damage == "no_manifest":
        (folder / MANIFEST_FILE).unlink()
    elif damage == "no_decoder":
        (folder / "decoder.onnx").unlink()
    else:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BackendError, match="scd-export"):
        OnnxEngine(scd(), folder)


def test_a_missing_runtime_is_named_with_its_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(BackendError, match=r"'onnxruntime'.*pip install 'scd-policy\[onnx\]'"):
        attach_backend(scd(), "onnx", checkpoint=tmp_path)
    assert not (tmp_path / EXPORT_FOLDER).exists()  # refused before exporting anything


def test_unsupported_backends_and_policies_are_refused() -> None:
    with pytest.raises(
        BackendError, match=r"backend='tensorrt' is not one of \['torch', 'onnx', 'compile'\]"
    ):
        attach_backend(scd(), "tensorrt")
    baseline = build_policy("diffusion_policy", "tiny", 5, 3, False, "cpu", 0)
    with pytest.raises(BackendError, match="runs 'scd' policies; this one is 'diffusion_policy'"):
        attach_backend(baseline, "onnx")
    assert attach_backend(baseline, "torch") is baseline
    assert isinstance(BackendError("x"), ConfigError)  # the CLIs print it as one line


def test_scd_export_checks_the_export_and_refuses_other_policies(golden: Path, tmp_path: Path) -> None:
    out = run_export(ExportConfig(checkpoint=str(golden), out=str(tmp_path / "exported"), check_steps=10))
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder_step.onnx", "manifest.json"]
    policy = load_policy(golden)
    assert isinstance(policy, SeparableCausalDiffusionPolicy)
    OnnxEngine(policy, out)  # the manifest matches the checkpoint's weights
    with pytest.raises(ConfigError, match="exports 'scd' policies"):
        run_export(ExportConfig(checkpoint=str(GOLDEN / "diffusion_policy")))


def test_the_compile_backend_streams_the_actions_torch_streams() -> None:
    policy = scd()
    # torch.compile with dynamic shapes: one graph as the cache grows (the first calls compile).
    assert stream_difference(policy, TorchGraphEngine(policy, compile=True), steps=6, num_envs=1) < TOLERANCE
