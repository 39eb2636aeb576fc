"""The latency comparison against LeRobot's own Diffusion Policy and ACT (docs/RESULTS.md) runs, at
matched parameter counts, and writes its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scd_policy.interop.lerobot_latency import run

pytestmark = pytest.mark.lerobot


def test_latency_against_lerobot_at_matched_size(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    rows = run(["--size", "base", "--rounds", "1", "--warmup", "0", "--history", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["rows"] == rows
    params = record["settings"]["params"]
    for name in ("lerobot_diffusion", "lerobot_act"):  # the closest of each grid
        assert abs(params[name] - params["scd"]) / params["scd"] < 0.1, params
    kinds = {(r["policy"], r["backend"], r["K"], r["mode"]) for r in rows}
    assert ("lerobot_diffusion", "torch", 10, "replan") in kinds and (
        "lerobot_act",
        "torch",
        None,
        "open_loop",
    ) in kinds
    assert {
        ("scd", b, k, m) for b in ("torch", "onnx") for k in (10, 2) for m in ("replan", "open_loop")
    } <= kinds
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["ratio_vs_scd"] > 0
        if (row["policy"], row["backend"], row["K"]) == ("scd", "torch", 10):
            assert row["ratio_vs_scd"] == 1.0 or row["mode"] == "open_loop_deferred"
