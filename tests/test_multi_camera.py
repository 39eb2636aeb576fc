"""Several cameras end to end on real MuJoCo: a two-camera dataset collected with ``cameras=``, trained
with each camera as its own token group, and rolled out with both cameras rendered under the keys the
policy was trained on, whatever their names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from envs.registry import make_env
from scd_policy.collection import CollectConfig, collect
from scd_policy.config import ConfigError
from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.evaluation import EnvSettings, EvalRunConfig, run_evaluation
from scd_policy.policies import load_policy
from scd_policy.training.experiment import compose_experiment, run_training

TASK = "reach_around"  # cameras top and side


def load_run_cameras(run_dir: Path) -> object:
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))["cameras"]  # type: ignore[index]


def test_env_renders_every_camera_key() -> None:
    env = make_env(TASK, image=True, image_size=24, cameras={"image_side": "side", "wrist": "top"})
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"state", "image", "image_side", "wrist"}
    assert all(
        obs[key].shape == (24, 24, 3) and obs[key].dtype == np.uint8 for key in ("image", "image_side")
    )
    np.testing.assert_array_equal(obs["image"], obs["wrist"])  # both from the top camera
    assert not np.array_equal(obs["image"], obs["image_side"])  # another viewpoint
    env.close()
    with pytest.raises(ValueError, match="has no camera 'wrist'"):
        make_env(TASK, cameras={"image_wrist": "wrist"})


def test_image_keys_map_to_cameras_by_name_or_by_mapping() -> None:
    shapes = {"state": [10], "image_top": [3, 16, 16], "cam_high": [3, 16, 16]}
    settings = EnvSettings.for_inputs(TASK, shapes, cameras={"cam_high": "side"})
    assert not settings.image and settings.image_size == 16
    assert dict(settings.cameras) == {"cam_high": "side", "image_top": "top"}
    with pytest.raises(ConfigError, match=r"image key 'cam_high'.*cameras=\{cam_high: <camera>\}"):
        EnvSettings.for_inputs(TASK, shapes)
    with pytest.raises(ConfigError, match="one square size"):
        EnvSettings.for_inputs(TASK, {"image_top": [3, 16, 16], "image_side": [3, 24, 24]})


@pytest.mark.slow
def test_two_camera_dataset_trains_and_rolls_out(tmp_path: Path) -> None:
    dataset = tmp_path / "two_cameras.zarr"
    report = collect(
        CollectConfig(
            task=TASK, episodes=3, out=str(dataset), cameras=["top", "side"], image_size=32, workers=0
        ),
        progress=False,
    )
    assert report.saved == 3
    buffer = ReplayBuffer.open(dataset)
    assert buffer.shapes["image_top"] == buffer.shapes["image_side"] == (32, 32, 3)
    assert buffer.meta["card"]["cameras"] == {"image_top": "top", "image_side": "side"}
    # The card's key -> camera mapping goes into the run config, for the rollouts.
    cfg = compose_experiment(
        [
            f"dataset={dataset}",
            f"out={tmp_path / 'run'}",
            f"task={TASK}",
            "size=tiny",
            "data.obs_keys=[state,image_top,image_side]",
            "train.steps=4",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.val_every=4",
            "train.checkpoint_every=4",
        ]
    )
    policy = load_policy(run_training(cfg))
    shapes = policy.config.input_shapes
    assert shapes["image_top"] == shapes["image_side"] == [3, 32, 32]
    assert cfg.cameras == {} and load_run_cameras(tmp_path / "run") == {
        "image_top": "top",
        "image_side": "side",
    }
    # Each camera is its own group of image tokens, with its own encoder.
    assert len(policy.tokenizer.image_encoders) == 2  # type: ignore[union-attr,arg-type]
    results = run_evaluation(
        EvalRunConfig(
            checkpoint=str(tmp_path / "run"),
            episodes=2,
            seeds=[0],
            n_envs=2,
            max_steps=10,
            videos=0,
            out=str(tmp_path / "eval.json"),
        )
    )
    assert results["episodes_per_seed"] == 2 and results["mean_episode_length"] == 10
