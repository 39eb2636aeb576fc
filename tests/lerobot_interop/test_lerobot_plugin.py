"""The lerobot_policy_scd plugin: LeRobot's own CLIs train and evaluate an SCD policy offline on CPU, and
its weights run in scd-policy's runtime."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot_helpers import IMAGE_SIZE, REPO_ID, TASK
from lerobot_policy_scd.modeling_scd import normalizer_from_stats

from lerobot_policy_scd import SCD_SUBFOLDER, SCDConfig, SCDPolicy
from scd_policy.config import ConfigError, PolicyConfig

pytestmark = pytest.mark.lerobot

BIN = Path(sys.executable).parent
# A policy small enough to train 20 steps in seconds on a CPU.
TINY = {
    "d_model": 32,
    "n_heads": 2,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "train_window": 4,
    "horizon": 4,
    "n_action_steps": 2,
    "image_channels": [8, 8],
    "n_context_tokens": 2,
    "image_tokens": 2,
}
TINY_ARGS = [f"--policy.{key}={value}".replace(" ", "") for key, value in TINY.items()]


def _run_cli(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{args[0]} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, lerobot_images: Path) -> tuple[Path, str]:
    """`lerobot-train --policy.type=scd` for 20 steps on the LeRobotDataset of our demos."""
    work = tmp_path_factory.mktemp("lerobot_train")
    output = _run_cli(
        [
            str(BIN / "lerobot-train"),
            f"--dataset.repo_id={REPO_ID}",
            f"--dataset.root={lerobot_images}",
            "--policy.type=scd",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--policy.diffusion.num_inference_steps=3",
            *TINY_ARGS,
            "--steps=20",
            "--batch_size=4",
            "--num_workers=0",
            "--log_freq=10",
            "--save_freq=20",
            "--seed=0",
            f"--output_dir={work / 'run'}",
            "--wandb.enable=false",
        ],
        cwd=work,
    )
    return work / "run" / "checkpoints" / "000020" / "pretrained_model", output


def test_lerobot_train_runs_scd_for_20_steps(trained: tuple[Path, str]) -> None:
    checkpoint, output = trained
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["type"] == "scd" and config["horizon"] == 4 and config["d_model"] == 32
    assert config["input_features"]["observation.images.top"]["shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    step = json.loads((checkpoint.parent / "training_state" / "training_step.json").read_text())
    assert step["step"] == 20
    losses = [float(x) for x in re.findall(r"step:\s*\d+ .*?loss:([0-9.eE+-]+)", output)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), output[-2000:]
    assert (checkpoint / SCD_SUBFOLDER / "model.safetensors").is_file()


def test_lerobot_train_fine_tunes_from_policy_path(
    trained: tuple[Path, str], lerobot_images: Path, tmp_path: Path
) -> None:
    """--policy.path: LeRobot's trainer overrides the processors' normaliser steps, which stay identity;
    the weights, the EMA copy and its update count continue from the checkpoint."""
    checkpoint, _ = trained
    _run_cli(
        [
            str(BIN / "lerobot-train"),
            f"--dataset.repo_id={REPO_ID}",
            f"--dataset.root={lerobot_images}",
            f"--policy.path={checkpoint}",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--steps=6",
            "--batch_size=4",
            "--num_workers=0",
            "--log_freq=3",
            "--save_freq=6",
            "--seed=1",
            f"--output_dir={tmp_path / 'finetune'}",
            "--wandb.enable=false",
        ],
        cwd=tmp_path,
    )
    tuned_dir = tmp_path / "finetune" / "checkpoints" / "000006" / "pretrained_model"
    base, tuned = SCDPolicy.from_pretrained(checkpoint), SCDPolicy.from_pretrained(tuned_dir)
    assert int(tuned.ema_updates) == int(base.ema_updates) + 6
    moved = [
        name
        for name, tensor in tuned.model.state_dict().items()
        if tensor.is_floating_point() and not torch.equal(tensor, base.model.state_dict()[name])
    ]
    assert moved  # it trained on, from the loaded weights
    config = json.loads((tuned_dir / "config.json").read_text())
    assert set(config["normalization_mapping"].values()) == {"IDENTITY"}


def test_ema_follows_the_weights_and_acts() -> None:
    torch.manual_seed(0)
    config = SCDConfig(device="cpu", ema_decay=0.9, **TINY)  # type: ignore[arg-type]
    _features(config)
    policy = SCDPolicy(config, dataset_stats=None)
    assert policy.ema_model is not None and policy.acting_model is policy.ema_model
    with torch.no_grad():
        for param in policy.model.parameters():
            param.add_(1.0)
    before = next(policy.ema_model.parameters()).clone()
    policy.update()
    after, trained_param = next(policy.ema_model.parameters()), next(policy.model.parameters())
    # Warm-up decay min(0.9, 2/11): the copy moves most of the way, not all of it.
    assert int(policy.ema_updates) == 1 and not torch.equal(after, before)
    assert not torch.allclose(after, trained_param)
    assert not any(p.requires_grad for p in policy.ema_model.parameters())
    assert {id(p) for group in policy.get_optim_params() for p in group["params"]} == {
        id(p) for p in policy.model.parameters()
    }
    off = SCDConfig(device="cpu", ema_decay=0.0, **TINY)  # type: ignore[arg-type]
    _features(off)
    plain = SCDPolicy(off)
    assert plain.ema_model is None and plain.acting_model is plain.model
    with pytest.raises(ConfigError, match=r"ema_decay=1\.0"):
        SCDConfig(device="cpu", ema_decay=1.0)  # type: ignore[arg-type]


def test_lerobot_checkpoint_runs_in_scd_runtime(
    trained: tuple[Path, str], demos: list[dict[str, np.ndarray]]
) -> None:
    from envs.registry import make_env
    from scd_policy.runtime import PolicyRuntime as Runtime

    checkpoint, _ = trained
    runtime = Runtime.from_pretrained(checkpoint / SCD_SUBFOLDER, num_inference_steps=3)
    config = runtime.config
    assert config.type == "scd" and config.horizon == 4 and config.action_dim == 2
    assert config.input_shapes == {"state": [6], "image": [3, IMAGE_SIZE, IMAGE_SIZE]}
    # The normaliser was fitted from LeRobot's dataset statistics: min/max of the demos' actions.
    actions = np.concatenate([demo["action"] for demo in demos])
    expected = (actions.max(0) + actions.min(0)) / 2
    stats = runtime.policy.normalizer._stats("action")
    np.testing.assert_allclose(stats.offset.numpy(), expected, rtol=1e-5, atol=1e-6)
    # The same weights LeRobot loads: the EMA copy, which acts and is exported.
    lerobot_policy = SCDPolicy.from_pretrained(checkpoint)
    assert int(lerobot_policy.ema_updates) == 20  # one update per optimiser step, kept in the checkpoint
    ours, theirs = runtime.policy.state_dict(), lerobot_policy.acting_model.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=f"weight {name}")
    # A short rollout on the task the data came from, through our step() API.
    env = make_env(TASK, image=True, image_size=IMAGE_SIZE)
    try:
        obs, _ = env.reset(seed=100)
        runtime.reset()
        for _ in range(6):
            action = runtime.step(obs)
            assert action.shape == (2,) and np.isfinite(action).all()
            obs, *_ = env.step(action)
    finally:
        env.close()


def test_lerobot_eval_runs_scd_on_our_task(trained: tuple[Path, str], tmp_path: Path) -> None:
    checkpoint, _ = trained
    _run_cli(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={checkpoint}",
            "--policy.device=cpu",
            "--env.type=scd",
            f"--env.task={TASK}",
            f"--env.image_size={IMAGE_SIZE}",
            "--env.episode_length=12",
            "--eval.n_episodes=2",
            "--eval.batch_size=2",
            f"--output_dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
    )
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 2
    assert 0.0 <= info["overall"]["pc_success"] <= 100.0


# ------------------------------------------------------------------------------ in-process unit tests


@pytest.mark.parametrize("architecture", ["scd", "causal_diffusion", "diffusion_policy"])
def test_delta_indices_are_policy_offsets(architecture: str) -> None:
    config = SCDConfig(device="cpu", architecture=architecture, **TINY)  # type: ignore[arg-type]
    reference = PolicyConfig(type=architecture, **TINY)  # type: ignore[arg-type]
    assert config.observation_delta_indices == reference.observation_offsets
    assert config.action_delta_indices == reference.action_offsets
    if architecture == "scd":
        assert config.action_delta_indices == [-1, 0, 1, 2, 3, 4, 5, 6]  # W + H actions from offset -1


def test_config_validation_is_policy_configs() -> None:
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        SCDConfig(device="cpu", d_model=32, n_heads=3)
    with pytest.raises(ConfigError, match=r"policy\.type='act'"):
        SCDConfig(device="cpu", architecture="act")
    with pytest.raises(ConfigError, match="normalization"):
        SCDConfig(device="cpu", normalization="zscore")


def test_normalizer_from_lerobot_stats() -> None:
    stats = {
        "observation.state": {"min": np.array([-1.0, 2.0]), "max": np.array([3.0, 2.0])},
        "action": {"mean": torch.tensor([0.5]), "std": torch.tensor([2.0])},
    }
    normalizer = normalizer_from_stats(
        {"state": [2], "action": [1]},
        {"state": "min_max", "action": "mean_std"},
        stats,
        {"state": "observation.state", "action": "action"},
    )
    # min_max: offset (max + min) / 2, scale (max - min) / 2; a constant dimension keeps scale 1.
    out = normalizer.normalize("state", torch.tensor([[3.0, 2.0], [-1.0, 5.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [-1.0, 3.0]]))
    torch.testing.assert_close(normalizer.normalize("action", torch.tensor([4.5])), torch.tensor([2.0]))
    with pytest.raises(KeyError, match=r"lack 'observation\.state'"):
        normalizer_from_stats({"state": [2]}, {"state": "min_max"}, {}, {"state": "observation.state"})


def _features(config: SCDConfig) -> None:
    config.input_features = {
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(3,)),
        "observation.images.top": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 16, 16)),
    }
    config.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))}


@pytest.mark.parametrize("architecture", ["scd", "causal_diffusion", "diffusion_policy"])
def test_policy_trains_and_acts_on_lerobot_batches(architecture: str) -> None:
    torch.manual_seed(0)
    config = SCDConfig(device="cpu", architecture=architecture, **TINY)  # type: ignore[arg-type]
    _features(config)
    stats = {
        "observation.state": {"min": np.zeros(3), "max": np.ones(3)},
        "action": {"min": -np.ones(2), "max": np.ones(2)},
    }
    policy = SCDPolicy(config, dataset_stats=stats)
    assert policy.key_map == {"observation.state": "state", "observation.images.top": "image"}
    b, t_obs, t_act = 2, len(config.observation_delta_indices), len(config.action_delta_indices)
    batch = {
        "observation.state": torch.rand(b, t_obs, 3),
        "observation.state_is_pad": torch.zeros(b, t_obs, dtype=torch.bool),
        "observation.images.top": torch.rand(b, t_obs, 3, 16, 16),
        "observation.images.top_is_pad": torch.zeros(b, t_obs, dtype=torch.bool),
        "action": torch.rand(b, t_act, 2) * 2 - 1,
        "action_is_pad": torch.zeros(b, t_act, dtype=torch.bool),
    }
    loss, metrics = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert metrics and all(isinstance(value, float) for value in metrics.values()), metrics
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # get_optim_params: the decoder's groups (SCD only) train at decoder_lr_scale x lr.
    lrs = sorted({group["lr"] for group in policy.get_optim_params()})
    assert lrs == ([3e-4, 6e-4] if architecture == "scd" else [3e-4])

    policy.eval()
    obs = {"observation.state": torch.rand(b, 3), "observation.images.top": torch.rand(b, 3, 16, 16)}
    chunk = policy.predict_action_chunk(obs)
    assert chunk.shape == (
        b,
        config.horizon - (config.n_obs_steps - 1 if architecture == "diffusion_policy" else 0),
        2,
    )
    policy.reset()
    with torch.inference_mode():
        actions = [policy.select_action(obs) for _ in range(3)]
    assert all(a.shape == (b, 2) and torch.isfinite(a).all() for a in actions)


def test_missing_feature_is_a_clear_error() -> None:
    config = SCDConfig(device="cpu", **TINY)  # type: ignore[arg-type]
    config.input_features = {}
    config.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))}
    with pytest.raises(ValueError, match="at least one observation feature"):
        SCDPolicy(config)
    _features(config)
    config.cameras = ["wrist"]
    with pytest.raises(ValueError, match=r"policy.cameras names \['wrist'\]"):
        SCDPolicy(config)
