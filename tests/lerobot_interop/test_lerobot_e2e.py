"""End to end: a LeRobotDataset made with LeRobot's API from our task's demos -> scd-convert -> our own
trainer for a few steps -> a short rollout of the trained SCD policy in that task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lerobot_helpers import IMAGE_SIZE, REPO_ID, TASK

from scd_policy.config import DataConfig, ExperimentConfig, PolicyConfig, TrainConfig
from scd_policy.data.replay_buffer import ReplayBuffer

pytestmark = pytest.mark.lerobot


def test_lerobot_dataset_to_trained_scd_policy(lerobot_video: Path, tmp_path: Path) -> None:
    from envs.registry import make_env
    from scd_policy.runtime import PolicyRuntime as Runtime
    from scd_policy.training.trainer import train

    buffer_path = tmp_path / "from_lerobot.zarr"
    # The installed console script, as a user runs it.
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "scd-convert"),
            "from-lerobot",
            f"--repo-id={REPO_ID}",
            f"--root={lerobot_video}",
            f"--out={buffer_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 episodes" in result.stdout
    buffer = ReplayBuffer.open(buffer_path)
    assert buffer.meta["card"]["camera"] == "top"

    cfg = ExperimentConfig(
        task=TASK,
        dataset=str(buffer_path),
        out=str(tmp_path / "run"),
        camera="top",
        policy=PolicyConfig(
            type="scd",
            horizon=4,
            n_action_steps=2,
            train_window=4,
            context_window=8,
            d_model=32,
            n_heads=2,
            encoder_layers=1,
            decoder_layers=1,
            n_context_tokens=2,
            image_tokens=2,
            image_channels=[8, 8],
        ),
        data=DataConfig(path=str(buffer_path), obs_keys=["state", "image"], val_ratio=0.34),
        train=TrainConfig(
            steps=6,
            batch_size=4,
            warmup_steps=1,
            device="cpu",
            amp=False,
            log_every=3,
            val_every=6,
            checkpoint_every=6,
        ),
    )
    policy_dir = train(cfg, tmp_path / "run")
    runtime = Runtime.from_pretrained(policy_dir, num_inference_steps=3)
    assert runtime.config.input_shapes == {"image": [3, IMAGE_SIZE, IMAGE_SIZE], "state": [6]}

    env = make_env(TASK, image=True, image_size=IMAGE_SIZE)
    try:
        obs, _ = env.reset(seed=7)
        runtime.reset()
        for _ in range(8):
            action = runtime.step(obs)
            assert action.shape == (2,) and np.isfinite(action).all()
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
    finally:
        env.close()
    assert len(runtime.latencies_ms) >= 1
