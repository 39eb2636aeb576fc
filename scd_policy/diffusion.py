"""Diffusion processes and samplers, apart from the networks.

A network is trained on ``prediction = f(x_t, t)`` with ``t`` a float tensor (N,) in [0, 1] — the
*network time* — and sampled through one kind of callable: ``prepare(times) -> step(x_t, k)``, built
once per sampling run for its K network times (``sample``):

- ``process="flow"`` (default): flow matching, ``x_t = (1 - t) x0 + t eps``; the network predicts the
  velocity ``eps - x0``; training times are logit-normal; sampling integrates from t = 1 (noise) to
  t = 0 (data) with ``K`` Euler steps.
- ``process="ddpm"``: discrete DDPM with ``num_train_timesteps`` steps and the ``squaredcos_cap_v2``
  schedule; the network predicts the noise eps and sees t = index / num_train_timesteps. Samplers:
  ancestral DDPM and deterministic DDIM (eta = 0) over ``K`` evenly spaced ("leading") timesteps;
  ``clip_sample`` clamps the predicted x0 to [-1, 1] (actions are normalised to that range).
  With ``shortcut`` the network is also told its step size and trained to be self-consistent across
  step sizes (``training_example``), so K = 1, 2, 4 ... steps of size 1/K sample well.
- ``process="regression"``: the ablation without diffusion — the network sees an all-zero chunk at
  t = 1 and predicts the chunk itself (MSE); sampling is that one call, whatever K.

Randomness comes only from the ``generator`` argument (or the caller's ``noise``), so sampling is
reproducible under a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from scd_policy.config import DiffusionConfig

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
# A denoiser prepared for one sampling run: (x_t, k) -> prediction at the k-th of ``sampling_times``.
StepFn = Callable[[Tensor, int], Tensor]
# Builds a StepFn from the run's network times (K,): lets a network compute everything that depends on
# t alone (time embedding, AdaLN modulation) once per run instead of once per denoising call.
PrepareFn = Callable[[Tensor], StepFn]


# ----------------------------------------------------------------------------- training


def sample_train_times(
    n: int,
    config: DiffusionConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Network times (n,) for a training batch: logit-normal (flow), uniform discrete steps (ddpm), or
    1 everywhere (regression: the network only ever sees that one level)."""
    gen_device = generator.device if generator is not None else "cpu"
    if config.process == "regression":
        t = torch.ones(n, device=gen_device)
    elif config.process == "flow":
        z = torch.randn(n, generator=generator, device=gen_device)
        t = torch.sigmoid(config.logit_normal_mean + config.logit_normal_std * z)
    else:
        steps = torch.randint(0, config.num_train_timesteps, (n,), generator=generator, device=gen_device)
        t = steps.to(torch.float32) / config.num_train_timesteps
    return t.to(device) if device is not None else t


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable against ``like`` (N, ...), in like's dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, config: DiffusionConfig) -> Tensor:
    """The noisy sample x_t for clean x0 (N, ...), noise of the same shape and network times t (N,);
    for regression the input holds nothing (zeros): the chunk comes from the conditioning alone."""
    if config.process == "regression":
        return torch.zeros_like(x0)
    if config.process == "flow":
        tt = _per_sample(t, x0)
        return (1 - tt) * x0 + tt * noise
    alpha_bar = _alpha_bar_at(t, config).to(x0.device)
    a = _per_sample(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(x0: Tensor, noise: Tensor, config: DiffusionConfig) -> Tensor:
    """What the network learns to predict: the velocity eps - x0 (flow), the noise eps (ddpm), or the
    chunk x0 itself (regression)."""
    if config.process == "regression":
        return x0
    return noise - x0 if config.process == "flow" else noise


# A step-conditioned denoiser evaluated on some rows of a training batch: (x_t, t, step, rows) -> the
# velocity of those rows (``rows`` picks their conditioning, e.g. context[rows]).
RowDenoiseFn = Callable[[Tensor, Tensor, Tensor, slice], Tensor]


@dataclass(frozen=True)
class TrainingExample:
    """One training batch's denoiser inputs and regression target."""

    x_t: Tensor  # (N, ...) noisy samples
    t: Tensor  # (N,) network times
    step: Tensor | None  # (N,) step sizes the denoiser is told (shortcut only; 0 = plain flow matching)
    target: Tensor  # (N, ...) what the prediction is regressed onto


def training_example(
    x0: Tensor, config: DiffusionConfig, denoise: RowDenoiseFn | None = None
) -> TrainingExample:
    """Noise clean chunks x0 (N, ...) for one training step of ``config``'s process.

    With ``config.shortcut`` the last ``shortcut_fraction`` of the rows train self-consistency (Frans
    et al. 2024, "One Step Diffusion via Shortcut Models"): for a step d = 2^j / 2^levels and a time t on
    the grid of 2d, the target of one step of 2d is the mean velocity of two steps of d taken by the
    network itself (``denoise``, without gradient); the smallest d is queried as d = 0, the flow-matching
    velocity, which anchors the recursion. The other rows are plain flow matching at d = 0.
    """
    noise = torch.randn_like(x0)
    if not config.shortcut:
        t = sample_train_times(x0.shape[0], config, device=x0.device)
        return TrainingExample(add_noise(x0, noise, t, config), t, None, training_target(x0, noise, config))
    if denoise is None:
        raise ValueError("diffusion.shortcut=true: training_example needs the denoiser for its targets")
    n = x0.shape[0]
    n_sc = min(n - 1, max(1, round(n * config.shortcut_fraction))) if n >= 2 else 0
    n_fm = n - n_sc
    t_fm = sample_train_times(n_fm, config, device=x0.device)
    # Self-consistency rows: level j in [0, levels), small step d = 2^j / 2^levels, big step 2d, and a
    # time t = 2d * k (k = 1 .. 1 / 2d) from which two small steps stay inside [0, 1].
    j = torch.randint(0, config.shortcut_levels, (n_sc,), device=x0.device)
    small = torch.pow(2.0, j.to(torch.float32) - config.shortcut_levels)
    big = 2 * small
    k = torch.floor(torch.rand(n_sc, device=x0.device) / big) + 1
    t_sc = (big * k).clamp(max=1.0)
    t = torch.cat([t_fm, t_sc])
    x_t = add_noise(x0, noise, t, config)
    rows = slice(n_fm, n)
    query = torch.where(j == 0, torch.zeros_like(small), small)  # the smallest step: plain flow's velocity
    with torch.no_grad():
        x_sc = x_t[rows]
        first = denoise(x_sc, t_sc, query, rows)
        second = denoise(x_sc - _per_sample(small, x_sc) * first, t_sc - small, query, rows)
        consistency = (first + second) / 2
    target = torch.cat([training_target(x0[:n_fm], noise[:n_fm], config), consistency])
    step = torch.cat([torch.zeros_like(t_fm), big])
    return TrainingExample(x_t, t, step, target)


# ----------------------------------------------------------------------------- DDPM schedule


@lru_cache(maxsize=8)
def _alphas_cumprod(num_train_timesteps: int, beta_schedule: str) -> tuple[float, ...]:
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021: alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2), betas capped.
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    elif beta_schedule == "linear":
        betas = [1e-4 + (0.02 - 1e-4) * i / (num_train_timesteps - 1) for i in range(num_train_timesteps)]
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r}; expected 'squaredcos_cap_v2' or 'linear'")
    out, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        out.append(product)
    return tuple(out)


def alphas_cumprod(config: DiffusionConfig) -> Tensor:
    """Cumulative products of (1 - beta) for the DDPM schedule, (num_train_timesteps,) float64."""
    return torch.tensor(
        _alphas_cumprod(config.num_train_timesteps, config.beta_schedule), dtype=torch.float64
    )


def _step_index(t: Tensor, config: DiffusionConfig) -> Tensor:
    index = torch.round(t.to(torch.float64) * config.num_train_timesteps).long()
    return index.clamp(0, config.num_train_timesteps - 1)


def _alpha_bar_at(t: Tensor, config: DiffusionConfig) -> Tensor:
    return alphas_cumprod(config).to(t.device)[_step_index(t, config)]


def resolve_num_steps(config: DiffusionConfig, num_steps: int | None) -> int:
    """K for a sampling run: ``num_steps``, or the config's default when None — checked here, the one
    place (>= 1; a DDPM/DDIM sampler takes at most ``num_train_timesteps``; regression always 1)."""
    if config.process == "regression":
        return 1
    steps = config.num_inference_steps if num_steps is None else int(num_steps)
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    if config.process == "ddpm" and steps > config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={steps} must be in [1, num_train_timesteps={config.num_train_timesteps}]"
        )
    return steps


def inference_timesteps(config: DiffusionConfig, num_steps: int) -> list[int]:
    """DDPM/DDIM step indices, highest first, evenly spaced from 0 ("leading" spacing)."""
    num_steps = resolve_num_steps(config, num_steps)
    ratio = config.num_train_timesteps // num_steps
    return [i * ratio for i in reversed(range(num_steps))]


# ----------------------------------------------------------------------------- sampling


def sampling_times(config: DiffusionConfig, num_steps: int) -> list[float]:
    """The network times of the K denoiser calls of a sampling run, in call order (every row of the
    batch is at the same time at every call)."""
    if config.process == "regression":
        return [1.0]
    if config.process == "flow":
        return [1.0 - k / num_steps for k in range(num_steps)]
    return [step / config.num_train_timesteps for step in inference_timesteps(config, num_steps)]


def initial_noise(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def sample(
    prepare: PrepareFn,
    shape: Sequence[int],
    config: DiffusionConfig,
    *,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    prefix: Tensor | None = None,
    prefix_start: int = 0,
) -> Tensor:
    """Draw clean samples of ``shape`` (N, ...) with the configured sampler and K = ``num_steps`` steps.

    ``prepare`` is called once with the run's network times (``sampling_times``, a float32 tensor (K,)
    on ``device``) and returns the step function ``(x_t, k) -> prediction`` of the k-th denoising call:
    a network computes what depends on t alone once per run there (``per_call`` adapts a plain
    ``(x_t, t) -> prediction`` function). ``noise`` (if given) is the starting point x_1 / x_T and must
    have ``shape``; otherwise it is drawn from ``generator``. The DDPM sampler draws its per-step noise
    from ``generator`` too.

    ``prefix`` (N, P, ...): entries ``prefix_start`` .. ``prefix_start + P - 1`` along dim 1 are known
    (inpainting by replacement): before every denoiser call they are set to the known values noised to
    that call's time with the run's own start noise, so the rest of the sample is drawn consistent with
    them, and the sample holds them there. A chunk sampled after actions already committed thus
    continues them (the seam's mode and motion), with no training.
    """
    steps = resolve_num_steps(config, num_steps)
    if noise is None:
        x = initial_noise(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(shape)}")
        x = noise.to(device=device if device is not None else noise.device, dtype=dtype)
    times = torch.tensor(sampling_times(config, steps), dtype=torch.float32, device=x.device)
    step_fn = prepare(times)
    if prefix is not None and config.process != "regression":
        known = slice(prefix_start, prefix_start + prefix.shape[1])
        step_fn = _inpainting(step_fn, prefix.to(x), known, x[:, known].clone(), times, config)
    if config.process == "regression":  # one call on an empty input: the prediction is the sample
        out = step_fn(torch.zeros_like(x), 0)
    elif config.process == "flow":
        out = euler_sample(step_fn, x, steps)
    elif config.sampler == "ddim":
        out = ddim_sample(step_fn, x, config, steps)
    else:
        out = ddpm_sample(step_fn, x, config, steps, generator=generator)
    if prefix is not None:
        out = out.clone()
        out[:, prefix_start : prefix_start + prefix.shape[1]] = prefix.to(out)
    return out


def _inpainting(
    step_fn: StepFn, values: Tensor, where: slice, noise: Tensor, times: Tensor, config: DiffusionConfig
) -> StepFn:
    """``step_fn`` with its input's entries ``where`` replaced by ``values`` noised to each call's time."""

    def step(x: Tensor, k: int) -> Tensor:
        x = x.clone()
        x[:, where] = add_noise(values, noise, times[k].expand(x.shape[0]), config)
        return step_fn(x, k)

    return step


def per_call(denoise_fn: DenoiseFn) -> PrepareFn:
    """A ``prepare`` for a network called as ``denoise_fn(x_t, t)`` with t (N,): nothing is precomputed."""

    def prepare(times: Tensor) -> StepFn:
        return lambda x, k: denoise_fn(x, times[k].expand(x.shape[0]))

    return prepare


def euler_sample(step_fn: StepFn, x: Tensor, num_steps: int) -> Tensor:
    """Flow matching: integrate dx/dt = v(x, t) from t = 1 to t = 0 in ``num_steps`` equal Euler steps."""
    for k in range(num_steps):
        t, t_next = 1.0 - k / num_steps, 1.0 - (k + 1) / num_steps
        x = x + (t_next - t) * step_fn(x, k)
    return x


def _predict_x0(x: Tensor, eps: Tensor, alpha_bar: float, clip: bool) -> tuple[Tensor, Tensor]:
    """x0 from the noise prediction; with clipping, eps is re-derived so x0 and eps stay consistent."""
    x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)
    return x0, eps


def _discrete_steps(config: DiffusionConfig, num_steps: int) -> Iterator[tuple[int, int, float, float, bool]]:
    """(index, schedule step, abar at it, abar at the next sampled step, is last) for DDPM/DDIM sampling;
    after the last step comes the clean sample, abar = 1."""
    abar = _alphas_cumprod(config.num_train_timesteps, config.beta_schedule)
    timesteps = inference_timesteps(config, num_steps)
    for i, step in enumerate(timesteps):
        last = i + 1 == len(timesteps)
        yield i, step, abar[step], 1.0 if last else abar[timesteps[i + 1]], last


def ddpm_sample(
    step_fn: StepFn,
    x: Tensor,
    config: DiffusionConfig,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM sampling over ``num_steps`` of the schedule's steps (posterior q(x_prev | x_t, x0))."""
    for i, _step, a_t, a_prev, last in _discrete_steps(config, num_steps):
        x0, _ = _predict_x0(x, step_fn(x, i), a_t, config.clip_sample)
        alpha = a_t / a_prev  # effective alpha of the (possibly skipped) transition
        beta = 1 - alpha
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
        if not last:  # the posterior's noise, except on the step that lands on the clean sample
            variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            z = initial_noise(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + math.sqrt(variance) * z
        else:
            x = mean
    return x


def ddim_sample(step_fn: StepFn, x: Tensor, config: DiffusionConfig, num_steps: int) -> Tensor:
    """Deterministic DDIM (eta = 0): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
    for i, _step, a_t, a_prev, _last in _discrete_steps(config, num_steps):
        x0, eps = _predict_x0(x, step_fn(x, i), a_t, config.clip_sample)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x
