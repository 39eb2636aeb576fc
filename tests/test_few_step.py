"""Few-step decoding (``diffusion.shortcut``): the self-consistency targets, the step-conditioned
decoder, sampling at K = 1 / 2, and distilling a trained scd decoder on a frozen encoder through
``scd-train train.init_from=... train.freeze=[...]`` on real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_policies import _one_thread, assert_loss_falls, batch_of, buffer, build, tiny_config

__all__ = ["_one_thread", "buffer"]  # the fixtures, shared with test_policies

from scd_policy import diffusion
from scd_policy.config import ConfigError, DiffusionConfig
from scd_policy.data import ReplayBuffer
from scd_policy.policies import CheckpointError, SeparableCausalDiffusionPolicy, load_policy
from scd_policy.training.checkpoint import freeze_parameters, init_weights
from scd_policy.training.experiment import compose_experiment, run_training

SHORTCUT = DiffusionConfig(shortcut=True, shortcut_levels=4)


# ----------------------------------------------------------------------------- targets


def test_self_consistency_of_an_exact_straight_flow_is_its_own_velocity() -> None:
    # For a point mass x0 the exact flow velocity is v(x, t) = (x - x0) / t along straight lines, so two
    # half steps average to the same velocity: every target must equal it, whatever the step.
    torch.manual_seed(0)
    x0 = torch.full((64, 6, 2), 0.3)

    def exact(x: torch.Tensor, t: torch.Tensor, step: torch.Tensor, rows: slice) -> torch.Tensor:
        return (x - x0[rows]) / t.view(-1, 1, 1)

    example = diffusion.training_example(x0, SHORTCUT, exact)
    assert example.step is not None
    exact_v = (example.x_t - x0) / example.t.view(-1, 1, 1)
    torch.testing.assert_close(example.target, exact_v, rtol=1e-4, atol=1e-4)
    n_sc = int((example.step > 0).sum())
    assert n_sc == round(64 * SHORTCUT.shortcut_fraction)
    # Self-consistency rows: big steps 2^-3 .. 1 on their grid, with two small steps inside [0, 1].
    big, t = example.step[-n_sc:], example.t[-n_sc:]
    levels = torch.log2(big)
    assert torch.allclose(levels, levels.round()) and levels.min() >= -3 and levels.max() <= 0
    assert bool((t >= big - 1e-6).all()) and bool((t <= 1 + 1e-6).all())
    assert torch.allclose(t / big, (t / big).round(), atol=1e-4)


def test_the_smallest_step_is_anchored_on_the_flow_velocity() -> None:
    torch.manual_seed(1)
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor, t: torch.Tensor, step: torch.Tensor, rows: slice) -> torch.Tensor:
        seen.append(step.clone())
        return torch.zeros_like(x)

    example = diffusion.training_example(torch.zeros(400, 4, 1), SHORTCUT, record)
    assert example.step is not None
    big = example.step[example.step > 0]
    # A pair whose big step is the smallest trained one (2 x 2^-4) queries its halves at d = 0.
    assert torch.equal(seen[0] == 0, torch.isclose(big, torch.tensor(2.0**-3)))
    with pytest.raises(ValueError, match="needs the denoiser"):
        diffusion.training_example(torch.zeros(4, 4, 1), SHORTCUT)


def test_plain_flow_examples_are_unchanged_by_the_option() -> None:
    torch.manual_seed(2)
    plain = diffusion.training_example(torch.ones(8, 4, 2), DiffusionConfig())
    assert plain.step is None
    torch.manual_seed(2)
    noise = torch.randn(8, 4, 2)
    t = diffusion.sample_train_times(8, DiffusionConfig())
    torch.testing.assert_close(plain.t, t)
    torch.testing.assert_close(plain.target, noise - 1)


# ----------------------------------------------------------------------------- the policy


def test_shortcut_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="process=flow"):
        DiffusionConfig(process="ddpm", sampler="ddim", shortcut=True)
    with pytest.raises(ConfigError, match="scd only"):
        tiny_config("diffusion_policy", diffusion=SHORTCUT)
    with pytest.raises(ConfigError, match="shortcut_fraction"):
        DiffusionConfig(shortcut=True, shortcut_fraction=1.0)


def test_a_shortcut_decoder_starts_as_the_plain_one_and_is_told_its_step(buffer: ReplayBuffer) -> None:
    torch.manual_seed(0)
    plain = build("scd", buffer)
    shortcut = build("scd", buffer, diffusion=SHORTCUT)
    assert isinstance(shortcut, SeparableCausalDiffusionPolicy) and shortcut.decoder.step_embed is not None
    assert not any("step_embed" in key for key in plain.state_dict())
    missing = shortcut.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("decoder.step_embed.") for key in missing)
    with torch.no_grad():  # give the zero-initialised output layers values so outputs are not all 0
        for module in (plain, shortcut):
            module.decoder.final.linear.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
            module.decoder.modulation.linear.weight.normal_(
                0, 0.1, generator=torch.Generator().manual_seed(4)
            )
    x, t, ctx = (
        torch.randn(3, 6, 2),
        torch.rand(3),
        torch.randn(3, shortcut.config.n_context_tokens, shortcut.config.d_model),
    )
    same = shortcut.decoder(x, shortcut.decoder.noise_levels(t, torch.full((3,), 0.5)), ctx)
    torch.testing.assert_close(same, plain.decoder(x, plain.decoder.noise_levels(t), ctx))
    with torch.no_grad():
        assert shortcut.decoder.step_embed is not None
        shortcut.decoder.step_embed.mlp[-1].weight.normal_(0, 0.1)
    told = shortcut.decoder(x, shortcut.decoder.noise_levels(t, torch.full((3,), 0.5)), ctx)
    assert not torch.allclose(told, same)


def test_shortcut_loss_falls_and_one_step_sampling_is_deterministic(buffer: ReplayBuffer) -> None:
    torch.manual_seed(0)
    policy = build("scd", buffer, diffusion=SHORTCUT)
    batch = batch_of(policy, buffer, list(range(0, 60, 3)))
    assert_loss_falls(policy, batch)  # the self-consistency rows included
    policy.eval()
    obs = {"state": batch["state"][:2]}
    history = {**obs, "action": batch["action"][:2, 1 : batch["state"].shape[1]]}
    chunks = []
    for k in (1, 2, 1):
        generator = torch.Generator().manual_seed(7)
        chunks.append(policy.predict_chunk(history, num_inference_steps=k, generator=generator))
    assert torch.equal(chunks[0], chunks[2])
    assert not torch.equal(chunks[0], chunks[1])
    assert bool(torch.isfinite(chunks[1]).all())


# ----------------------------------------------------------------------------- distillation


@pytest.mark.slow
def test_distilling_a_trained_decoder_on_a_frozen_encoder(buffer: ReplayBuffer, tmp_path: Path) -> None:
    common = [
        f"dataset={buffer.path}",
        "size=tiny",
        "policy.horizon=6",
        "policy.n_action_steps=3",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.log_every=5",
        "train.val_every=10",
        "train.checkpoint_every=10",
        "train.num_threads=1",
    ]
    teacher_run = tmp_path / "teacher"
    teacher = run_training(compose_experiment([*common, f"out={teacher_run}", "train.steps=10"]))
    student_run = tmp_path / "student"
    student_cfg = compose_experiment(
        [
            *common,
            f"out={student_run}",
            "train.steps=10",
            f"train.init_from={teacher_run}",
            "train.freeze=[encoder.,tokenizer.]",
            "policy.diffusion.shortcut=true",
            "policy.diffusion.shortcut_levels=3",
        ]
    )
    student = run_training(student_cfg)
    before, after = (
        load_file(str(teacher / "model.safetensors")),
        load_file(str(student / "model.safetensors")),
    )
    frozen = [key for key in before if key.startswith(("encoder.", "tokenizer."))]
    assert frozen and all(torch.equal(before[key], after[key]) for key in frozen)
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("decoder."))
    assert any(key.startswith("decoder.step_embed.") for key in after)
    policy = load_policy(student)
    assert policy.config.diffusion.shortcut
    obs = {"state": torch.zeros(1, 2, 4), "action": torch.zeros(1, 1, 2)}
    assert policy.predict_chunk(obs, num_inference_steps=1).shape == (1, 6, 2)

    # Another policy type, another size, or a freeze prefix that names nothing: one clear message.
    with pytest.raises(CheckpointError, match="does not fit this run's policy"):
        run_training(
            compose_experiment(
                [
                    *common,
                    f"out={tmp_path / 'wide'}",
                    "train.steps=1",
                    f"train.init_from={teacher_run}",
                    "policy.d_model=48",
                ]
            )
        )
    with pytest.raises(CheckpointError, match="holds a 'scd' policy"):
        run_training(
            compose_experiment(
                [
                    *common,
                    f"out={tmp_path / 'dp'}",
                    "train.steps=1",
                    f"train.init_from={teacher_run}",
                    "policy=diffusion_policy",
                ]
            )
        )
    with pytest.raises(ConfigError, match="names no parameter"):
        run_training(
            compose_experiment(
                [*common, f"out={tmp_path / 'bad'}", "train.steps=1", "train.freeze=[encodr.]"]
            )
        )


def test_init_weights_and_freeze_units(buffer: ReplayBuffer, tmp_path: Path) -> None:
    source = build("scd", buffer)
    source.save_pretrained(tmp_path / "policy")
    target = build("scd", buffer, diffusion=SHORTCUT)
    missing = init_weights(target, tmp_path / "policy")
    assert missing and all(key.startswith("decoder.step_embed.") for key in missing)
    torch.testing.assert_close(target.encoder.state_dict(), source.encoder.state_dict())
    frozen = freeze_parameters(target, ["encoder."])
    assert frozen == sum(p.numel() for p in target.encoder.parameters())
    assert not any(p.requires_grad for p in target.encoder.parameters())
    assert all(p.requires_grad for p in target.decoder.parameters())
    assert all(
        g["params"] and all(p.requires_grad for p in g["params"]) for g in target.param_groups(1e-3, 0.1)
    )
