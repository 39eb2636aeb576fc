"""scd-bench: the CLI writes results.json with the documented schema (no timing assertions), and the
optimised sampling path (modulations prepared once per run) equals the reference per-call path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scd_policy.bench import BenchConfig, run_suites
from scd_policy.bench.limit import kernel_ms, record_compute
from scd_policy.bench.report import markdown
from scd_policy.bench.setup import build_policy, context_window_for, training_batch
from scd_policy.config import ConfigError, DiffusionConfig
from scd_policy.models.layers import AdaLNDenoiser, NoiseLevels
from scd_policy.runtime import PolicyRuntime

REQUIRED = {"policy", "K", "history", "batch", "p50_ms", "p90_ms", "params", "ratio_vs_scd", "mode", "suite"}


def test_cli_latency_quick_writes_the_documented_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = [
        "suite=latency",
        "quick=true",
        "size=tiny",
        f"out={out}",
        "ks=[1,4]",
        "histories=[3,6]",
        "rounds=3",
    ]
    subprocess.run([sys.executable, "-m", "scd_policy.cli.bench", *args], check=True, timeout=120)
    rows = json.loads((out / "results.json").read_text())
    # 3 policies x 2 K x 2 histories x 2 modes (replan every step, open loop).
    assert len(rows) == 3 * 2 * 2 * 2
    for row in rows:
        assert set(row) >= REQUIRED, sorted(REQUIRED - set(row))
        assert row["suite"] == "latency" and row["batch"] == 1 and row["size"] == "tiny"
        assert 0 < row["p50_ms"] <= row["p90_ms"]
    assert {(r["K"], r["history"]) for r in rows} == {(1, 3), (1, 6), (4, 3), (4, 6)}
    assert {r["mode"] for r in rows} == {"replan_every_step", "open_loop"}
    for row in rows:
        if row["policy"] == "scd":
            assert row["ratio_vs_scd"] == 1.0
        else:
            scd = next(
                r
                for r in rows
                if r["policy"] == "scd" and all(r[k] == row[k] for k in ("mode", "K", "history"))
            )
            assert row["ratio_vs_scd"] == pytest.approx(row["p50_ms"] / scd["p50_ms"])
    params = {r["policy"]: r["params"] for r in rows}
    assert set(params) == {"scd", "causal_diffusion", "diffusion_policy"}
    assert max(params.values()) / min(params.values()) <= 1.1
    # The causal policies' cache holds the history (+ the current step); the windowed one has none.
    cache = {(r["policy"], r["history"]): r["state_mb"] for r in rows}
    assert cache[("scd", 6)] > cache[("scd", 3)] > 0 and cache[("diffusion_policy", 6)] == 0
    assert (out / "results.md").read_text().startswith("# scd-bench results")
    environment = json.loads((out / "environment.json").read_text())
    assert environment["params"] == params and environment["threads"] == 1


def test_train_and_context_suites_rows() -> None:
    results = run_suites(
        BenchConfig(suite="train", size="tiny", train_batch=2, train_rounds=1, warmup=0, policies=["scd"])
    )
    (row,) = results["rows"]
    assert row["suite"] == "train" and row["samples_per_s"] > 0 and row["ratio_vs_scd"] == 1.0
    results = run_suites(
        BenchConfig(
            suite="context",
            size="tiny",
            context_histories=[2],
            context_k=3,
            rounds=2,
            warmup=0,
            policies=["scd", "causal_diffusion"],
        )
    )
    rows = results["rows"]
    assert sorted((r["policy"], r["K"]) for r in rows) == [
        ("causal_diffusion", 1),
        ("causal_diffusion", 3),
        ("scd", 1),
        ("scd", 3),
    ]
    for row in rows:
        if row["K"] == 3:
            one = next(r for r in rows if r["policy"] == row["policy"] and r["K"] == 1)
            assert row["per_denoise_step_ms"] == pytest.approx((row["p50_ms"] - one["p50_ms"]) / 2)


@pytest.mark.parametrize(
    ("policy_type", "overrides"),
    [
        ("scd", {}),
        ("scd", {"past_actions": 3, "prev_action_input": False, "train_window": 4}),
        ("causal_diffusion", {"past_actions": 2}),
        ("diffusion_policy", {}),
    ],
)
def test_training_batch_has_the_layout_compute_loss_expects(
    policy_type: str, overrides: dict[str, object]
) -> None:
    # The train suite's synthetic batch must follow the policy's recipe (past actions widen the sample).
    policy = build_policy(policy_type, "tiny", 5, 2, False, "cpu", 0, overrides)
    batch = training_batch(policy, 2, 0)
    assert batch["action"].shape[1] == len(policy.config.action_offsets)
    loss, _ = policy.train().compute_loss(batch)
    assert torch.isfinite(loss)


def test_serve_suite_rows_and_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = [
        "suite=serve",
        "size=tiny",
        f"out={out}",
        "serve_sessions=[1,3]",
        "serve_ticks=4",
        "serve_rounds=1",
        "serve_rate_hz=20",
        "serve_defer_encoding=true",  # every session buffers its steps to its next replan
    ]
    subprocess.run([sys.executable, "-m", "scd_policy.cli.bench", *args], check=True, timeout=300)
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["mode"], r["batch"]) for r in rows) == sorted(
        (mode, n) for mode in ("local", "served_unbatched", "served_batched", "served_paced") for n in (1, 3)
    )
    by = {(r["mode"], r["batch"]): r for r in rows}
    for row in rows:
        assert row["suite"] == "serve" and row["policy"] == "scd" and row["actions_per_s"] > 0
        assert row["defer_encoding"] is True
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["n"] == 4 * row["batch"]  # one latency per session per measured tick
        assert row["p99_vs_single"] == pytest.approx(row["p99_ms"] / by[(row["mode"], 1)]["p99_ms"])
        if row["mode"] == "served_paced":
            # Robots on their own 20 Hz clocks: at most their rate, and no throughput ratio.
            assert row["rate_hz"] == 20.0 and row["speedup_vs_unbatched"] is None
            assert row["actions_per_s"] <= 20.0 * row["batch"] * 1.05
            continue
        unbatched = by[("served_unbatched", row["batch"])]
        assert row["speedup_vs_unbatched"] == pytest.approx(row["actions_per_s"] / unbatched["actions_per_s"])
    report = (out / "results.md").read_text()
    assert "## serve" in report and "| served_batched | 3 |" in report and "| served_paced | 3 |" in report
    assert (out / "serve.png").stat().st_size > 0


def test_latency_rows_of_scd_on_other_backends() -> None:
    results = run_suites(
        BenchConfig(
            suite="latency",
            size="tiny",
            ks=[2],
            histories=[3],
            rounds=2,
            warmup=0,
            policies=["scd", "causal_diffusion", "diffusion_policy"],
            backends=["torch", "onnx"],
            deferred_open_loop=True,
        )
    )
    rows = results["rows"]
    causal = (("scd", "torch"), ("scd", "onnx"), ("causal_diffusion", "torch"))
    assert sorted((r["policy"], r["backend"], r["mode"]) for r in rows) == sorted(
        [
            *((p, b, m) for p, b in causal for m in ("replan_every_step", "open_loop", "open_loop_deferred")),
            *(("diffusion_policy", "torch", m) for m in ("replan_every_step", "open_loop")),
        ]
    )
    for row in rows:  # every ratio against scd on torch, in the same run
        scd = next(r for r in rows if (r["policy"], r["backend"], r["mode"]) == ("scd", "torch", row["mode"]))
        assert row["ratio_vs_scd"] == pytest.approx(row["p50_ms"] / scd["p50_ms"])
    for row in rows:  # an open-loop cycle's slowest tick is its replan: above the mean per tick
        assert (row["replan_tick_ms"] is None) == (row["mode"] == "replan_every_step")
        assert row["replan_tick_ms"] is None or row["replan_tick_ms"] >= row["p50_ms"] * 0.5
    report = markdown(results, "scd-bench backends=[torch,onnx]")
    assert "| scd [onnx] | replan_every_step | 2 | 3 | 1 |" in report


def test_limit_suite_puts_each_step_next_to_its_bound() -> None:
    results = run_suites(
        BenchConfig(
            suite="limit",
            size="tiny",
            ks=[1, 3],
            histories=[2],
            rounds=2,
            warmup=0,
            policies=["scd", "diffusion_policy"],
            backends=["torch", "onnx"],
        )
    )
    rows = {(r["policy"], r["backend"], r["K"]): r for r in results["rows"]}
    assert set(rows) == {
        (p, b, k)
        for p, b in (("scd", "torch"), ("scd", "onnx"), ("diffusion_policy", "torch"))
        for k in (1, 3)
    }
    for row in rows.values():
        assert row["suite"] == "limit" and row["size"] == "tiny" and row["batch"] == 1
        assert row["flops_bound_ms"] > 0 and row["bound_ms"] > 0 and row["p50_ms"] <= row["p99_ms"]
        assert row["ratio_vs_bound"] == pytest.approx(row["p50_ms"] / row["bound_ms"])
    for policy in ("scd", "diffusion_policy"):  # K decoder calls more: more arithmetic, more kernels
        assert rows[(policy, "torch", 3)]["gflop_per_step"] > rows[(policy, "torch", 1)]["gflop_per_step"]
        assert rows[(policy, "torch", 3)]["kernel_calls"] > rows[(policy, "torch", 1)]["kernel_calls"]
    # A backend runs the same arithmetic: the same bound.
    assert rows[("scd", "onnx", 3)]["bound_ms"] == rows[("scd", "torch", 3)]["bound_ms"]
    assert "| scd [onnx] | tiny | 3 |" in markdown(results, "scd-bench suite=limit")


def test_recorded_kernels_and_their_flops() -> None:
    linear = torch.nn.Linear(16, 32)
    x = torch.randn(5, 16)

    def step() -> None:
        with torch.inference_mode():  # as a runtime step runs: composite ops are seen whole there
            linear(x)
            torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 6, 8) for _ in range(3)))

    calls = record_compute(step)
    assert [str(c.func) for c in calls] == [
        "aten.addmm.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
    ]
    assert calls[0].flops == 2 * 5 * 16 * 32
    assert calls[1].flops == 2 * 2 * (2 * 6 * 6 * 8)  # scores and weighted values, 2 heads
    assert kernel_ms(calls[0], min_time_s=0.001) > 0 and calls[0].key != calls[1].key


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="backends"):
        BenchConfig(backends=["onnx"])  # torch is every ratio's reference
    with pytest.raises(ConfigError, match="backends"):
        BenchConfig(backends=["torch", "tensorrt"])
    with pytest.raises(ConfigError, match="suite"):
        BenchConfig(suite="speed")
    with pytest.raises(ConfigError, match="policies"):
        BenchConfig(policies=["act"])
    with pytest.raises(ConfigError, match="histories"):
        BenchConfig(histories=[0])
    with pytest.raises(ConfigError, match="size"):
        run_suites(BenchConfig(size="huge"))


class _PerRowLevels:
    """Stands in for SharedModulations: the k-th level computed per row from t, as training does."""

    def __init__(self, model: AdaLNDenoiser, times: torch.Tensor, step_size: float | None) -> None:
        self.model, self.times, self.step_size = model, times, step_size

    def at(self, k: int) -> NoiseLevels:
        t = self.times[k : k + 1]  # (1,): broadcast over the rows
        step = None if self.step_size is None else torch.full_like(t, self.step_size)
        return self.model.noise_levels(t, step)


@pytest.mark.parametrize("policy_type", ["scd", "scd_shortcut", "causal_diffusion", "diffusion_policy"])
def test_prepared_sampling_equals_the_per_row_path(policy_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling reads each denoising call's conditioning from ``prepare`` (computed once per run and
    folded into layer_norm); the per-row conditioning training uses gives the same chunk (for a
    shortcut decoder too, told its step size 1/K either way)."""
    torch.manual_seed(0)
    shortcut = policy_type == "scd_shortcut"
    overrides = {"diffusion": DiffusionConfig(shortcut=True)} if shortcut else None
    policy = build_policy("scd" if shortcut else policy_type, "tiny", 5, 3, False, "cpu", 0, overrides)
    with torch.no_grad():
        for param in policy.parameters():  # non-trivial modulation tables and output layers
            if param.dim() >= 1:
                param.normal_(0.0, 0.1)
    history = {"state": torch.randn(2, 4, 5)}
    if policy.config.is_causal:
        history["action"] = torch.randn(2, 3, 3)
    noise = torch.randn(2, policy.config.horizon, 3)
    with torch.no_grad():
        fast = policy.predict_chunk(history, num_inference_steps=5, noise=noise)
        monkeypatch.setattr(
            AdaLNDenoiser,
            "prepare",
            lambda self, times, step_size=None: _PerRowLevels(self, times, step_size),
        )
        slow = policy.predict_chunk(history, num_inference_steps=5, noise=noise)
    assert fast.abs().mean() > 0.1
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_runtime_history_stays_at_the_primed_length() -> None:
    policy = build_policy("scd", "tiny", 5, 3, False, "cpu", 0)
    runtime = PolicyRuntime(
        policy, num_inference_steps=1, replan_every_step=True, context_window=context_window_for(4)
    )
    for _ in range(9):
        runtime.step({"state": torch.randn(5)})
    assert runtime._state.cache.n_steps == 5  # 4 past steps + the current one
