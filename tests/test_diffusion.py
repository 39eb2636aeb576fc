"""Diffusion processes and samplers, tested against hand-derived values and oracle denoisers."""

from __future__ import annotations

import math

import pytest
import torch

from scd_policy import diffusion
from scd_policy.config import DiffusionConfig

FLOW = DiffusionConfig(process="flow", sampler="euler", num_inference_steps=4)
DDPM = DiffusionConfig(process="ddpm", sampler="ddpm", num_inference_steps=10, num_train_timesteps=100)
DDIM = DiffusionConfig(process="ddpm", sampler="ddim", num_inference_steps=10, num_train_timesteps=100)
TARGET = torch.tensor([[0.3, -0.7], [0.9, 0.1]])  # the one "data point" of each sample


def test_flow_interpolation_and_velocity_target() -> None:
    x0, noise = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    t = torch.tensor([0.0, 0.25])
    x_t = diffusion.add_noise(x0, noise, t, FLOW)
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0: data
    torch.testing.assert_close(x_t[1], torch.full((3,), 0.75 * 2.0 - 0.25))  # (1 - t) x0 + t eps
    torch.testing.assert_close(diffusion.training_target(x0, noise, FLOW), torch.full((2, 3), -3.0))


def test_flow_euler_recovers_a_point_mass_with_the_exact_velocity() -> None:
    # For data concentrated at TARGET the exact velocity is (x_t - x0) / t; Euler is then exact.
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - TARGET) / t[:, None]

    for steps in (1, 3, 10):
        out = diffusion.sample(
            diffusion.per_call(velocity),
            TARGET.shape,
            FLOW,
            num_steps=steps,
            generator=torch.Generator().manual_seed(0),
        )
        torch.testing.assert_close(out, TARGET, atol=1e-5, rtol=0)


def test_squaredcos_schedule_matches_its_closed_form() -> None:
    abar = diffusion.alphas_cumprod(DDPM)
    assert abar.shape == (100,) and bool((abar[1:] < abar[:-1]).all())

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # Without the 0.999 cap, prod(1 - beta_i) telescopes to f((i + 1) / T) / f(0).
    for i in (0, 10, 50, 90):
        assert abar[i].item() == pytest.approx(f((i + 1) / 100) / f(0), rel=1e-9)
    assert abar[-1].item() < 1e-3  # fully noised at the last step


def test_ddpm_noising_uses_the_schedule() -> None:
    x0, noise = torch.ones(1, 2), torch.full((1, 2), 2.0)
    t = torch.tensor([0.37])  # step index 37
    a = diffusion.alphas_cumprod(DDPM)[37].item()
    expected = math.sqrt(a) * 1.0 + math.sqrt(1 - a) * 2.0
    torch.testing.assert_close(diffusion.add_noise(x0, noise, t, DDPM), torch.full((1, 2), expected))
    assert torch.equal(diffusion.training_target(x0, noise, DDPM), noise)


def test_inference_timesteps_leading_spacing() -> None:
    assert diffusion.inference_timesteps(DDPM, 10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert diffusion.inference_timesteps(DDPM, 3) == [66, 33, 0]
    with pytest.raises(ValueError, match="num_inference_steps"):
        diffusion.inference_timesteps(DDPM, 101)


@pytest.mark.parametrize("config", [DDPM, DDIM], ids=["ddpm", "ddim"])
def test_ddpm_samplers_recover_a_point_mass_with_the_exact_noise(config: DiffusionConfig) -> None:
    abar = diffusion.alphas_cumprod(config)

    def oracle_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[torch.round(t * 100).long()].to(x.dtype)[:, None]
        return (x - a.sqrt() * TARGET) / (1 - a).sqrt()

    out = diffusion.sample(
        diffusion.per_call(oracle_eps),
        TARGET.shape,
        config,
        num_steps=7,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(out, TARGET, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [FLOW, DDPM, DDIM], ids=["flow", "ddpm", "ddim"])
def test_samplers_are_deterministic_under_a_seed(config: DiffusionConfig) -> None:
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + torch.sin(3 * t)[:, None, None]

    def run(seed: int) -> torch.Tensor:
        return diffusion.sample(
            diffusion.per_call(denoise), (3, 4, 2), config, generator=torch.Generator().manual_seed(seed)
        )

    torch.testing.assert_close(run(0), run(0), atol=0, rtol=0)
    assert not torch.allclose(run(0), run(1))
    # Given the same starting noise, only DDPM's per-step noise still depends on the generator.
    noise = torch.randn(3, 4, 2)
    a = diffusion.sample(
        diffusion.per_call(denoise),
        (3, 4, 2),
        config,
        noise=noise,
        generator=torch.Generator().manual_seed(0),
    )
    b = diffusion.sample(
        diffusion.per_call(denoise),
        (3, 4, 2),
        config,
        noise=noise,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(a, b) == (config.sampler != "ddpm")


def test_clip_sample_bounds_ddim_output() -> None:
    def wild(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -10.0 * torch.ones_like(x)

    gen = torch.Generator().manual_seed(0)
    clipped = diffusion.sample(diffusion.per_call(wild), (2, 5), DDIM, generator=gen)
    assert float(clipped.abs().max()) <= 1.0 + 1e-6
    unclipped_cfg = DiffusionConfig(
        process="ddpm", sampler="ddim", clip_sample=False, num_train_timesteps=100
    )
    unclipped = diffusion.sample(
        diffusion.per_call(wild), (2, 5), unclipped_cfg, generator=torch.Generator().manual_seed(0)
    )
    assert float(unclipped.abs().max()) > 1.0


def test_train_times() -> None:
    gen = torch.Generator().manual_seed(0)
    t = diffusion.sample_train_times(20_000, FLOW, generator=gen)
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    assert float(t.median()) == pytest.approx(0.5, abs=0.02)  # sigmoid(N(0, 1)) has median 0.5
    shifted = DiffusionConfig(logit_normal_mean=1.0)
    assert float(diffusion.sample_train_times(20_000, shifted, generator=gen).median()) == pytest.approx(
        1 / (1 + math.exp(-1.0)), abs=0.02
    )
    steps = diffusion.sample_train_times(1000, DDPM, generator=gen) * 100
    torch.testing.assert_close(steps, steps.round())
    assert float(steps.min()) >= 0 and float(steps.max()) <= 99


def test_noise_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="noise has shape"):
        diffusion.sample(diffusion.per_call(lambda x, t: x), (2, 3), FLOW, noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=">= 1"):
        diffusion.sample(diffusion.per_call(lambda x, t: x), (2, 3), FLOW, num_steps=0)


def test_regression_is_one_call_to_the_chunk_itself() -> None:
    config = DiffusionConfig(process="regression")
    assert config.sampler == "direct"  # its only sampler, set for the default
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = diffusion.sample_train_times(3, config)
    assert torch.equal(t, torch.ones(3))
    assert torch.equal(diffusion.add_noise(x0, noise, t, config), torch.zeros_like(x0))  # input: nothing
    assert torch.equal(diffusion.training_target(x0, noise, config), x0)  # target: the chunk
    calls: list[tuple[torch.Tensor, int]] = []

    def prepare(times: torch.Tensor) -> diffusion.StepFn:
        assert times.tolist() == [1.0]

        def step(x: torch.Tensor, k: int) -> torch.Tensor:
            calls.append((x, k))
            return x + TARGET

        return step

    out = diffusion.sample(prepare, TARGET.shape, config, num_steps=10, noise=torch.randn(TARGET.shape))
    assert len(calls) == 1 and torch.equal(calls[0][0], torch.zeros(TARGET.shape))  # K is ignored
    torch.testing.assert_close(out, TARGET)
