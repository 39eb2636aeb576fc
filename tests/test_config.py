"""The typed config schema: validation, time offsets, Hydra composition, and configs shipped in the wheel."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from scd_policy.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ExperimentConfig,
    PolicyConfig,
    TrainConfig,
    config_dir,
    policy_config_from_dict,
    register_configs,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- offsets
def test_causal_offsets() -> None:
    policy = PolicyConfig(type="scd", train_window=4, horizon=3, n_action_steps=2, context_window=8)
    assert policy.is_causal and policy.chunk_start_offset == 0
    assert policy.observation_offsets == [0, 1, 2, 3]
    # The previous action (-1), then every action the window's chunks need: 4 + 3 - 1 = 6 more.
    assert policy.action_offsets == [-1, 0, 1, 2, 3, 4, 5]
    baseline = dataclasses.replace(policy, type="causal_diffusion")
    assert baseline.action_offsets == policy.action_offsets


def test_diffusion_policy_offsets() -> None:
    policy = PolicyConfig(type="diffusion_policy", n_obs_steps=2, horizon=16, n_action_steps=8)
    assert policy.observation_offsets == [-1, 0]
    assert policy.action_offsets == list(range(-1, 15))
    three = PolicyConfig(type="diffusion_policy", n_obs_steps=3, horizon=5, n_action_steps=3)
    assert three.observation_offsets == [-2, -1, 0]
    assert three.action_offsets == [-2, -1, 0, 1, 2]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: PolicyConfig(type="diffusion_policy", n_obs_steps=2, horizon=16, n_action_steps=16),
            r"n_action_steps=16 must be <= horizon - n_obs_steps \+ 1 = 15",
        ),
        (lambda: PolicyConfig(horizon=4, n_action_steps=5), "n_action_steps=5 must be <= horizon=4"),
        (lambda: PolicyConfig(type="mlp"), "policy.type='mlp'"),
        (lambda: PolicyConfig(d_model=100, n_heads=3), "divisible by n_heads"),
        (lambda: PolicyConfig(d_model=12, n_heads=4), "even"),
        (lambda: PolicyConfig(train_window=32, context_window=16), "context_window=16 must be >= train_w"),
        (lambda: PolicyConfig(horizon=0), "policy.horizon must be >= 1"),
        (lambda: PolicyConfig(prev_action_dropout=1.0), r"prev_action_dropout=1.0 must be in \[0, 1\)"),
        (lambda: PolicyConfig(dropout=1.0), "dropout"),
        (lambda: DiffusionConfig(process="flow", sampler="ddim"), "does not fit process 'flow'"),
        (
            lambda: DiffusionConfig(process="ddpm", sampler="ddim", num_inference_steps=200),
            "exceeds num_train_timesteps=100",
        ),
        (lambda: DataConfig(val_ratio=1.0), r"val_ratio=1.0 must be in \[0, 1\)"),
        (lambda: DataConfig(obs_keys=["state", "action"]), "action_key must not be an observation key"),
        (lambda: DataConfig(max_train_episodes=0), "max_train_episodes must be >= 1"),
        (lambda: TrainConfig(device="tpu"), "train.device='tpu'"),
        (lambda: TrainConfig(ema_decay=1.0), "ema_decay"),
        (lambda: EvalConfig(seeds=[]), "at least one seed"),
        (lambda: EvalConfig(context_window=0), "eval.context_window=0: expected >= 1"),
    ],
)
def test_validation_errors(build: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_context_window_defaults_to_the_training_window() -> None:
    # Attending further back at run time than in training is opt-in (it cost success on Meta-World).
    assert PolicyConfig(train_window=32).context_window == 32
    assert PolicyConfig(train_window=8, context_window=24).context_window == 24
    assert dataclasses.replace(PolicyConfig(train_window=8), horizon=4, n_action_steps=4).context_window == 8


def test_limits_are_inclusive() -> None:
    PolicyConfig(type="diffusion_policy", n_obs_steps=2, horizon=16, n_action_steps=15)
    PolicyConfig(type="scd", horizon=4, n_action_steps=4, train_window=16, context_window=16)


def test_policy_config_from_dict_round_trip_and_unknown_keys() -> None:
    policy = PolicyConfig(type="causal_diffusion", horizon=8, n_action_steps=4, input_shapes={"state": [3]})
    assert policy_config_from_dict(dataclasses.asdict(policy)) == policy
    with pytest.raises(ConfigError, match=r"unknown policy config keys \['colour'\]"):
        policy_config_from_dict({"colour": 1})


# ----------------------------------------------------------------------------- Hydra
SIZES = {"tiny": (64, 2, 1), "small": (128, 5, 1), "base": (256, 7, 1)}


def _compose(overrides: list[str]) -> ExperimentConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=["dataset=datasets/x.zarr", *overrides])
    experiment = OmegaConf.to_object(cfg)
    assert isinstance(experiment, ExperimentConfig)
    return experiment


@pytest.mark.parametrize("policy", ["scd", "causal_diffusion", "diffusion_policy"])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_compose_every_policy_and_size(policy: str, size: str) -> None:
    experiment = _compose([f"policy={policy}", f"size={size}"])
    assert isinstance(experiment.policy, PolicyConfig) and isinstance(experiment.data, DataConfig)
    assert experiment.policy.type == policy
    d_model, enc, dec = SIZES[size]
    assert (
        experiment.policy.d_model,
        experiment.policy.encoder_layers,
        experiment.policy.decoder_layers,
    ) == (
        d_model,
        enc,
        dec,
    )
    if policy == "diffusion_policy":
        assert experiment.policy.observation_offsets == [-1, 0]


def test_compose_defaults_and_validating_overrides() -> None:
    experiment = _compose(["train.steps=10"])
    assert experiment.policy.type == "scd" and experiment.policy.d_model == 128  # defaults: scd, small
    assert experiment.train.steps == 10
    with pytest.raises(ConfigError, match=r"horizon - n_obs_steps \+ 1 = 15"):
        _compose(["policy=diffusion_policy", "policy.n_action_steps=16"])


# ----------------------------------------------------------------------------- packaging
def test_config_dir_finds_the_checkout_configs() -> None:
    found = config_dir()
    assert found == REPO / "configs"
    assert (found / "train.yaml").is_file()
    assert {p.stem for p in (found / "policy").glob("*.yaml")} >= {
        "scd",
        "causal_diffusion",
        "diffusion_policy",
    }
    assert {p.stem for p in (found / "size").glob("*.yaml")} >= set(SIZES)


def test_wheel_carries_the_configs(tmp_path: Path) -> None:
    """Build the wheel (about a second with hatchling, no isolation) and use config_dir() from it."""
    pytest.importorskip("hatchling")
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)]
    subprocess.run([sys.executable, "-m", "pip", *build], check=True, timeout=120)
    (wheel,) = tmp_path.glob("scd_policy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        expected = {
            f"scd_policy/configs/{p.relative_to(REPO / 'configs')}"
            for p in (REPO / "configs").rglob("*.yaml")
        }
        assert expected and expected <= names
        archive.extractall(tmp_path / "site")
    # From the unpacked wheel (no checkout next to it) config_dir() must find the packaged copy.
    probe = "from scd_policy.config import config_dir; print(config_dir())"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    assert Path(out) == tmp_path / "site" / "scd_policy" / "configs"


def test_training_warns_when_the_task_needs_more_history_than_the_policy_sees(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from scd_policy.training.experiment import warn_if_history_too_short

    caplog.set_level(logging.WARNING, logger="scd_policy.train")
    short = _compose(["size=tiny"])  # the default 2-step window
    assert warn_if_history_too_short(short, "memory_cue")
    assert "task memory_cue needs ~32 steps of history" in caplog.text
    assert "Set policy.train_window and policy.context_window to 32" in caplog.text
    caplog.clear()
    assert warn_if_history_too_short(_compose(["policy=diffusion_policy"]), "memory_cue")
    assert "Set policy.n_obs_steps to 32" in caplog.text
    caplog.clear()
    wide = _compose(["policy.train_window=32", "policy.context_window=32"])
    assert not warn_if_history_too_short(wide, "memory_cue")
    # Tasks whose last observations suffice, no task, and a dataset's unknown task: nothing to say.
    assert not any(warn_if_history_too_short(short, task) for task in ("push_t", "", "someone_elses_task"))
    assert caplog.text == ""
