"""Fixtures of the fault tests: a small real dataset and a tiny trained run.

Each fault test reproduces one way a user (or a crash, or a full disk) can break a run and asserts three
things: the message names what is wrong, the exit code (or exception type) is the documented one, and
what was written before is intact and loadable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fault_helpers import TASK, tiny_overrides

from scd_policy.collection import CollectConfig, collect
from scd_policy.training.experiment import compose_experiment, run_training


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults_data") / f"{TASK}.zarr"
    report = collect(CollectConfig(task=TASK, episodes=4, out=str(path), workers=0), progress=False)
    assert report.saved == 4
    return path


@pytest.fixture(scope="session")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
    run_dir = tmp_path_factory.mktemp("faults_run") / "run"
    run_training(compose_experiment(tiny_overrides(dataset, run_dir, 4)))
    return run_dir


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy
