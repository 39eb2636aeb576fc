"""Fixtures of the server tests: a tiny trained run (the server processes: serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import TASK

from scd_policy.collection import CollectConfig, collect
from scd_policy.training.experiment import compose_experiment, run_training


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step scd run on real reach_around demonstrations (its task recorded for scd-eval)."""
    root = tmp_path_factory.mktemp("serve")
    dataset = root / f"{TASK}.zarr"
    collect(CollectConfig(task=TASK, episodes=4, out=str(dataset), workers=0), progress=False)
    run_dir = root / "run"
    overrides = [
        f"dataset={dataset}",
        f"out={run_dir}",
        f"task={TASK}",
        "size=tiny",
        "policy.train_window=4",
        "policy.context_window=4",
        "policy.horizon=8",
        "policy.n_action_steps=4",
        "policy.diffusion.num_inference_steps=3",
        "train.steps=6",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.val_every=1000",
        "train.checkpoint_every=6",
        "train.num_threads=1",
        "eval.episodes=1",
        "eval.n_envs=1",
        "eval.videos=0",
    ]
    run_training(compose_experiment(overrides))
    return run_dir
