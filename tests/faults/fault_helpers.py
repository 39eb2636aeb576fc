"""Helpers of the fault tests: CLI runners, the message check, tiny training overrides, a small tmpfs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TASK = "reach_around"
VENV_BIN = Path(sys.executable).parent


def cli(name: str) -> list[str]:
    """The console script ``name`` of this environment (``python -m`` where it is not installed)."""
    script = VENV_BIN / name
    modules = {"scd-train": "train", "scd-eval": "eval", "scd-collect": "collect"}
    return [str(script)] if script.exists() else [sys.executable, "-m", f"scd_policy.cli.{modules[name]}"]


def run_cli(name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SCD_DEBUG", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [*cli(name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_message(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A non-zero exit with a message holding every fragment, and no Python traceback."""
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr[-3000:]}"


def tiny_overrides(dataset: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"dataset={dataset}",
        f"out={out}",
        "size=tiny",
        "policy.train_window=2",
        "policy.context_window=2",
        "policy.horizon=8",
        "policy.n_action_steps=4",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.log_every=2",
        "train.val_every=1000",
        "train.checkpoint_every=2",
        "train.num_threads=1",
        *extra,
    ]


@contextlib.contextmanager
def small_tmpfs(where: Path, size_bytes: int) -> Iterator[Path]:
    """A real filesystem of ``size_bytes`` mounted at ``where`` (needs root, as CI and the dev machines
    run); elsewhere the test is skipped — but never in CI, where it must run."""
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the disk-full tests in CI: {result.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
