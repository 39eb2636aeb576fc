"""The three policies behind one protocol: losses, masks, inference, streaming, checkpoints, sizes,
per-step cost in layer calls, and overfitting a small real replay buffer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from scd_policy.config import ConfigError, DiffusionConfig, PolicyConfig, config_dir
from scd_policy.data import Normalizer, ReplayBuffer, WindowedDataset, fit_normalizer
from scd_policy.models.layers import AdaLNBlock, Block
from scd_policy.policies import (
    CausalDiffusionPolicy,
    CausalPolicy,
    CheckpointError,
    DiffusionPolicy,
    Policy,
    SeparableCausalDiffusionPolicy,
    load_policy,
    make_policy,
)
from scd_policy.runtime import PolicyRuntime

TYPES = ("scd", "causal_diffusion", "diffusion_policy")
STATE_DIM, ACTION_DIM, IMAGE = 4, 2, (3, 16, 16)
HORIZON, WINDOW = 6, 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These networks are tiny: with two threads on a shared 2-core machine, thread hand-offs cost more
    # than the arithmetic (measured 5-8x slower per training step under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def size_preset(name: str) -> dict[str, Any]:
    values = OmegaConf.to_container(OmegaConf.load(config_dir() / "size" / f"{name}.yaml"))
    assert isinstance(values, dict)
    return {str(k): v for k, v in values.items()}


def tiny_config(policy_type: str, image: bool = False, **overrides: Any) -> PolicyConfig:
    shapes = {"state": [STATE_DIM]}
    if image:
        shapes["image"] = list(IMAGE)
    values: dict[str, Any] = {
        **size_preset("tiny"),
        "type": policy_type,
        "horizon": HORIZON,
        "n_action_steps": 3,
        "train_window": WINDOW,
        "context_window": 7,
        "n_obs_steps": 2,
        "input_shapes": shapes,
        "action_dim": ACTION_DIM,
    }
    values.update(overrides)
    return PolicyConfig(**values)


# ----------------------------------------------------------------------------- a small real dataset


def smooth_episode(rng: np.random.Generator, length: int, image: bool) -> dict[str, np.ndarray]:
    """A point circling at a per-episode speed: state (pos, vel), action = next velocity command."""
    phase, speed, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.3), rng.uniform(0.5, 1.0)
    angle = phase + speed * np.arange(length + 1)
    pos = radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    vel = np.diff(pos, axis=0)
    episode: dict[str, np.ndarray] = {
        "state": np.concatenate([pos[:-1], vel], axis=-1).astype(np.float32),
        "action": (vel * 5.0).astype(np.float32),
    }
    if image:
        frames = np.zeros((length, IMAGE[1], IMAGE[2], 3), dtype=np.uint8)
        cells = ((pos[:-1] + 1) / 2 * (IMAGE[1] - 1)).round().astype(int)
        for i, (x, y) in enumerate(cells):
            frames[i, y, x] = (255, 128, 0)
        episode["image"] = frames
    return episode


@pytest.fixture(scope="module")
def buffer(tmp_path_factory: pytest.TempPathFactory) -> ReplayBuffer:
    path = tmp_path_factory.mktemp("data") / "circles.zarr"
    rng = np.random.default_rng(0)
    writer = ReplayBuffer.create(path, meta={"fps": 10})
    for _ in range(4):
        writer.append_episode(smooth_episode(rng, 24, image=True))
    return ReplayBuffer.open(path)


def build(policy_type: str, buffer: ReplayBuffer, image: bool = False, **overrides: Any) -> Policy:
    config = tiny_config(policy_type, image=image, **overrides)
    modes = {"state": "min_max", "action": "min_max", **({"image": "image"} if image else {})}
    normalizer = fit_normalizer(buffer, np.arange(buffer.n_episodes), modes)
    return make_policy(config, normalizer)


def batch_of(policy: Policy, buffer: ReplayBuffer, indices: list[int]) -> dict[str, torch.Tensor]:
    config = policy.config
    dataset = WindowedDataset(
        buffer,
        np.arange(buffer.n_episodes),
        sorted(config.input_shapes),
        config.observation_offsets,
        config.action_offsets,
    )
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def randomize_zero_init(policy: nn.Module, std: float = 0.1) -> None:
    """Fresh AdaLN-Zero networks output 0 whatever their input; give the zero parts random values so
    comparisons of predictions are meaningful."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in policy.parameters():
            if param.dim() >= 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def causal_history(
    policy: Policy, buffer: ReplayBuffer, steps: int, episode: int = 0
) -> dict[str, torch.Tensor]:
    data = buffer.get_episode(episode)
    history = {"state": torch.from_numpy(data["state"][None, :steps])}
    if "image" in policy.config.input_shapes:
        history["image"] = torch.from_numpy(
            np.moveaxis(data["image"][None, :steps], -1, -3) / np.float32(255)
        )
    history["action"] = torch.from_numpy(data["action"][None, : steps - 1])
    return history


# ----------------------------------------------------------------------------- sizes and cost


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_scd_and_causal_diffusion_sizes_within_ten_percent(
    preset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = {}
    for policy_type in TYPES:
        config = PolicyConfig(
            **size_preset(preset),
            type=policy_type,
            input_shapes={"state": [10], "image": [3, 96, 96]},
            action_dim=4,
        )
        modes = {"state": "min_max", "image": "image", "action": "min_max"}
        normalizer = Normalizer({"state": [10], "image": [3, 96, 96], "action": [4]}, modes)
        counts[policy_type] = sum(p.numel() for p in make_policy(config, normalizer).parameters())
    with capsys.disabled():
        print(f"\n[{preset}] parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    ratio = counts["causal_diffusion"] / counts["scd"]
    assert 0.9 <= ratio <= 1.1, counts


@contextlib.contextmanager
def count_block_calls(policy: nn.Module) -> Iterator[dict[str, int]]:
    counts = {"encoder": 0, "decoder": 0, "all": 0}
    handles = []
    for name, module in policy.named_modules():
        if isinstance(module, Block | AdaLNBlock):
            part = "encoder" if name.startswith("encoder.") else "decoder"

            def hook(*_: Any, part: str = part) -> None:
                counts[part] += 1
                counts["all"] += 1

            handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def test_per_step_cost_in_layer_calls(buffer: ReplayBuffer) -> None:
    """One control step with a replan and K denoising steps: SCD L_enc + K*L_dec block calls, the
    monolithic baseline L + K*L, the windowed baseline K*L (it re-encodes its window each call)."""
    k = 5
    cfg = tiny_config("scd")
    l_enc, l_dec = cfg.encoder_layers, cfg.decoder_layers
    obs = {"state": torch.randn(1, STATE_DIM)}
    expected = {
        "scd": {"encoder": l_enc, "decoder": k * l_dec},
        "causal_diffusion": {"all": (l_enc + l_dec) * (1 + k)},
    }
    for policy_type, want in expected.items():
        policy = build(policy_type, buffer).eval()
        assert isinstance(policy, CausalPolicy)
        cache = policy.init_cache()
        for _ in range(3):  # a growing history: the cost per step does not grow with it
            with torch.no_grad(), count_block_calls(policy) as counts:
                context = policy.encode_step(obs, torch.zeros(1, ACTION_DIM), cache)
                policy.sample_chunk(context, num_inference_steps=k)
            for part, n in want.items():
                assert counts[part] == n, (policy_type, counts)
    policy = build("diffusion_policy", buffer).eval()
    with count_block_calls(policy) as counts:
        policy.predict_chunk({"state": torch.randn(1, 2, STATE_DIM)}, num_inference_steps=k)
    assert counts["all"] == k * (l_enc + l_dec)


# ----------------------------------------------------------------------------- training inputs


@pytest.mark.parametrize("policy_type", TYPES)
@pytest.mark.parametrize("image", [False, True], ids=["state", "image"])
def test_loss_and_inference_end_to_end(policy_type: str, image: bool, buffer: ReplayBuffer) -> None:
    policy = build(policy_type, buffer, image=image)
    batch = batch_of(policy, buffer, [0, 5, 23, 30])  # 23: last step of episode 0 (padding)
    before = {key: value.clone() for key, value in batch.items()}
    loss, metrics = policy.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for key, value in before.items():  # the batch is never mutated
        assert torch.equal(batch[key], value), key
    policy.eval()
    if policy_type == "diffusion_policy":
        history = {k: v[:2] for k, v in batch.items() if k in policy.config.input_shapes}
    else:
        history = causal_history(policy, buffer, steps=4)
    chunk = policy.predict_chunk(history, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (next(iter(history.values())).shape[0], HORIZON, ACTION_DIM)
    assert torch.isfinite(chunk).all()


@pytest.mark.parametrize("policy_type", ["scd", "causal_diffusion"])
def test_prev_action_dropout_hides_previous_actions_in_training_only(
    policy_type: str, buffer: ReplayBuffer
) -> None:
    plain = build(policy_type, buffer, prev_action_dropout=0.0)
    dropping = build(policy_type, buffer, prev_action_dropout=0.5)
    dropping.load_state_dict(plain.state_dict())
    batch = batch_of(plain, buffer, [5, 30])
    plain.train()
    dropping.train()
    torch.manual_seed(0)
    reference = plain.training_inputs(batch).tokens  # (B, W, S, D); slot -1: the previous action
    torch.manual_seed(0)
    dropped = dropping.training_inputs(batch).tokens
    assert torch.equal(dropped[:, :, :-1], reference[:, :, :-1])  # observation tokens untouched
    changed = (dropped[:, :, -1] != reference[:, :, -1]).any(dim=-1)  # (B, W)
    assert 0 < int(changed.sum()) < changed.numel()  # some steps lose their previous action, not all
    # A hidden previous action is the "no previous action" token of an episode start.
    no_prev = dropping.tokenizer(
        {"state": torch.zeros(1, 1, STATE_DIM)},
        torch.zeros(1, 1, ACTION_DIM),
        torch.zeros(1, 1, dtype=torch.bool),
    )[0, 0, -1]
    torch.testing.assert_close(dropped[:, :, -1][changed], no_prev.expand(int(changed.sum()), -1))
    dropping.eval()
    torch.testing.assert_close(
        dropping.training_inputs(batch).tokens, plain.eval().training_inputs(batch).tokens
    )


@pytest.mark.parametrize("policy_type", ["scd", "causal_diffusion"])
def test_without_prev_action_input_the_actions_never_reach_the_policy(
    policy_type: str, buffer: ReplayBuffer
) -> None:
    torch.manual_seed(0)
    policy = build(policy_type, buffer, prev_action_input=False, past_actions=2)
    with_input = build(policy_type, buffer)
    assert policy.tokenizer.tokens_per_step == with_input.tokenizer.tokens_per_step - 1
    randomize_zero_init(policy)
    policy.eval()
    history = causal_history(policy, buffer, 5)
    noise = torch.randn(1, HORIZON, ACTION_DIM)
    chunk = policy.predict_chunk(history, num_inference_steps=2, noise=noise)
    # Other executed actions give the same chunk: nothing but the observations is read.
    scrambled = dict(history, action=torch.randn_like(history["action"]) * 10)
    torch.testing.assert_close(policy.predict_chunk(scrambled, num_inference_steps=2, noise=noise), chunk)
    # It still streams (the run-time path hands it previous actions it ignores) and still learns, with
    # the past actions now a target recovered from the observation history only (past-token prediction).
    runtime = PolicyRuntime(policy, num_inference_steps=2)
    runtime.reset(seed=0)
    action = runtime.step({"state": history["state"][0, 0].numpy()})
    assert action.shape == (ACTION_DIM,) and np.isfinite(action).all()
    assert_loss_falls(policy, batch_of(policy, buffer, [0, 9, 30, 41]))


def assert_loss_falls(policy: Policy, batch: dict[str, torch.Tensor]) -> None:
    """60 AdamW steps on ``batch`` cut the loss (measured with fixed noise, in eval mode) by 3x."""

    def fixed_noise_loss() -> float:
        torch.manual_seed(1234)
        with torch.no_grad():
            return float(policy.eval().compute_loss(batch)[0])

    initial = fixed_noise_loss()
    optimizer = torch.optim.AdamW(policy.param_groups(3e-3, 0.0))
    policy.train()
    for _ in range(60):
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_noise_loss() < initial / 3


@pytest.mark.parametrize("policy_type", ["scd", "causal_diffusion"])
def test_past_actions_extend_every_chunk_backwards_and_still_learn(
    policy_type: str, buffer: ReplayBuffer
) -> None:
    # Past-token prediction: each step's chunk starts P = 3 actions back; step i's targets are the
    # window's actions from offset i - 3 on, and a past action before the episode start is masked.
    torch.manual_seed(0)
    policy = build(policy_type, buffer, past_actions=3)
    assert policy.config.chunk_start_offset == -3 and policy.config.action_offsets[0] == -3
    batch = batch_of(policy, buffer, [0, 9, 30, 41])  # index 0: an episode start
    inputs = policy.eval().training_inputs(batch)
    actions = policy.normalizer.normalize("action", batch["action"])  # offsets -3 .. W + H - 2
    for i in range(WINDOW):
        torch.testing.assert_close(inputs.chunks[:, i], actions[:, i : i + HORIZON])  # offset i - 3 on
    assert not bool(inputs.mask[0, 0, :3].any()) and bool(inputs.mask[1, 0].all())  # before the start
    # The previous-action tokens are the same as without the lever (offset i - 1 for step i).
    plain = build(policy_type, buffer)
    plain.load_state_dict(policy.state_dict())
    plain_batch = batch_of(plain, buffer, [0, 9, 30, 41])
    torch.testing.assert_close(inputs.tokens, plain.eval().training_inputs(plain_batch).tokens)

    assert_loss_falls(policy, batch)
    # At run time the past part is dropped: the runtime executes from the current tick on.
    runtime = PolicyRuntime(policy.eval(), num_inference_steps=2)
    assert runtime.chunk_len == HORIZON - 3
    with pytest.raises(ConfigError, match=r"past_actions=6 must be in \[0, horizon=6\)"):
        tiny_config(policy_type, past_actions=6)


def test_random_history_cuts_what_each_step_attends_to_in_training_only(buffer: ReplayBuffer) -> None:
    torch.manual_seed(0)
    policy = build("scd", buffer, random_history=1.0)
    randomize_zero_init(policy)
    batch = batch_of(policy, buffer, [0, 9, 30, 41])
    # Validation (eval mode) sees every earlier step: no span is drawn.
    assert policy.eval().training_inputs(batch).history_span is None
    inputs = policy.train().training_inputs(batch)
    span = inputs.history_span
    assert span is not None and span.shape == (4, WINDOW)
    steps = torch.arange(WINDOW)
    assert bool((span >= 0).all()) and bool((span <= steps).all())  # 0 .. the steps before each one
    tokens = inputs.tokens
    policy.eval()
    with torch.no_grad():
        full = policy.encoder(tokens)
        # A full span is the plain causal pass; a zero span encodes each step on its own.
        torch.testing.assert_close(policy.encoder(tokens, history_span=steps.expand(4, WINDOW)), full)
        alone = policy.encoder(tokens, history_span=torch.zeros(4, WINDOW, dtype=torch.long))
        for i in range(WINDOW):
            torch.testing.assert_close(alone[:, i], policy.encoder(tokens[:, i : i + 1])[:, 0])
        # A span of k limits every layer's attention to k steps back: with the 2 encoder layers, step 3
        # at span 1 reads steps 1-3 (step 2 read step 1 a layer below) and never step 0.
        one = torch.full((4, WINDOW), 1).minimum(steps)
        cut = policy.encoder(tokens, history_span=one)
        moved = tokens.clone()
        moved[:, 0] += torch.randn_like(moved[:, 0])  # (a constant shift would vanish in LayerNorm)
        torch.testing.assert_close(policy.encoder(moved, history_span=one)[:, 3], cut[:, 3])
        moved[:, 1] += torch.randn_like(moved[:, 1])
        assert (policy.encoder(moved, history_span=one)[:, 3] - cut[:, 3]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="a call with a cache has none"):
        policy.encoder(tokens, policy.new_cache(None), history_span=span)
    assert_loss_falls(policy, batch)
    with pytest.raises(ConfigError, match="scd's lever only; this policy is causal_diffusion"):
        tiny_config("causal_diffusion", random_history=0.5)


@pytest.mark.parametrize("policy_type", ["scd", "causal_diffusion"])
def test_decoder_steps_denoise_a_subset_in_training_only_and_still_learn(
    policy_type: str, buffer: ReplayBuffer
) -> None:
    torch.manual_seed(0)
    policy = build(policy_type, buffer, decoder_steps=2)
    batch = batch_of(policy, buffer, [0, 9, 30, 41])
    policy.train()
    inputs = policy.training_inputs(batch)
    assert inputs.steps.shape == (2,) and bool((inputs.steps[1:] > inputs.steps[:-1]).all())
    assert inputs.chunks.shape[1] == 2 and inputs.tokens.shape[1] == WINDOW  # the encoder sees them all
    full = build(policy_type, buffer)
    full.load_state_dict(policy.state_dict())
    torch.manual_seed(3)
    chosen = full.train().training_inputs(batch)
    torch.testing.assert_close(inputs.chunks, chosen.chunks[:, inputs.steps])  # the same chunks, a subset
    policy.eval()  # validation and inference: every step
    assert policy.training_inputs(batch).steps.tolist() == list(range(WINDOW))

    # The loss still falls (the subset changes every step; the fixed-noise loss reads every step).
    assert_loss_falls(policy, batch)
    with pytest.raises(ConfigError, match=r"decoder_steps=9 must be in \[0, train_window=5\]"):
        tiny_config(policy_type, decoder_steps=9)


@pytest.mark.parametrize("policy_type", ["scd", "causal_diffusion"])
def test_padded_steps_and_actions_do_not_enter_the_loss(policy_type: str, buffer: ReplayBuffer) -> None:
    policy = build(policy_type, buffer)
    randomize_zero_init(policy)
    batch = batch_of(policy, buffer, [0, 15])  # sample 0: an episode start
    assert bool(batch["action_is_pad"][0, 0])
    # Sample 1 as if its episode ended two steps before the window does (the dataset only makes such
    # windows for episodes shorter than the window).
    batch["obs_is_pad"][1, -2:] = True
    batch["action_is_pad"][1, -1 - HORIZON :] = True  # actions after the last real step (offset W-3)
    garbage = {key: value.clone() for key, value in batch.items()}
    garbage["state"][batch["obs_is_pad"]] = 1e3  # steps past the episode end
    # The previous action at an episode start. (Padded actions *inside* a chunk stay part of the noisy
    # decoder input, as edge-padded copies of the last action; only their loss terms are masked.)
    garbage["action"][0, 0] = -1e3

    def loss_of(b: Mapping[str, torch.Tensor]) -> float:
        torch.manual_seed(7)
        return policy.compute_loss(b)[0].item()

    assert loss_of(garbage) == pytest.approx(loss_of(batch), rel=1e-5)
    changed = {key: value.clone() for key, value in batch.items()}
    changed["action"][0, 3] += 1.0  # a real action: the loss must see it
    assert loss_of(changed) != pytest.approx(loss_of(batch), rel=1e-5)


def test_scd_context_is_causal_at_policy_level(buffer: ReplayBuffer) -> None:
    policy = build("scd", buffer, image=True).eval()
    assert isinstance(policy, SeparableCausalDiffusionPolicy)
    history = causal_history(policy, buffer, steps=6)
    prev = torch.cat([torch.zeros(1, 1, ACTION_DIM), history["action"]], dim=1)
    valid = torch.tensor([[False] + [True] * 5])
    obs = {k: history[k] for k in ("state", "image")}
    ctx = policy.encoder(policy.tokenize(obs, prev, valid))
    later = {k: v.clone() for k, v in obs.items()}
    later["image"][:, 3:] = torch.rand_like(later["image"][:, 3:])
    later["state"][:, 3:] += torch.randn_like(later["state"][:, 3:])
    ctx2 = policy.encoder(policy.tokenize(later, prev, valid))
    torch.testing.assert_close(ctx2[:, :3], ctx[:, :3], atol=1e-6, rtol=0)
    assert (ctx2[:, 3:] - ctx[:, 3:]).abs().max() > 1e-4


@pytest.mark.parametrize("policy_type", TYPES)
def test_training_noise_only_in_train_mode(policy_type: str, buffer: ReplayBuffer) -> None:
    policy = build(policy_type, buffer, history_noise=0.5, context_noise=0.5)
    randomize_zero_init(policy)
    batch = batch_of(policy, buffer, [2, 40])
    quiet = build(policy_type, buffer)  # same weights, no training noise
    quiet.load_state_dict(policy.state_dict())

    def loss_of(p: Policy, train: bool) -> float:
        p.train(train)
        torch.manual_seed(11)
        with torch.no_grad():
            return p.compute_loss(batch)[0].item()

    # In eval mode (validation) the noise is off: the loss equals the noise-free policy's exactly.
    assert loss_of(policy, False) == loss_of(quiet, False)
    assert loss_of(policy, True) != pytest.approx(loss_of(quiet, True), rel=1e-4)


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("policy_type", ["scd", "causal_diffusion"])
def test_predict_chunk_equals_streaming_steps_including_eviction(
    policy_type: str, buffer: ReplayBuffer
) -> None:
    policy = build(policy_type, buffer)
    randomize_zero_init(policy)
    policy.eval()
    assert isinstance(policy, CausalPolicy)
    steps = 10  # > context_window = 7: the sliding window is in play
    history = causal_history(policy, buffer, steps=steps)
    noise = torch.randn(1, HORIZON, ACTION_DIM)
    expected = policy.predict_chunk(history, noise=noise, num_inference_steps=4)
    cache = policy.init_cache()
    with torch.no_grad():
        for i in range(steps):
            prev = history["action"][:, i - 1] if i > 0 else None
            context = policy.encode_step({"state": history["state"][:, i]}, prev, cache)
        streamed = policy.sample_chunk(context, noise=noise, num_inference_steps=4)
    assert cache.n_steps == policy.config.context_window
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=0)
    # The previous action matters: an explicit one for step 1 changes the chunk.
    with_prev = policy.predict_chunk(
        {**causal_history(policy, buffer, steps=3), "prev_action": torch.ones(1, ACTION_DIM)}, noise=noise
    )
    without = policy.predict_chunk(causal_history(policy, buffer, steps=3), noise=noise)
    assert (with_prev - without).abs().max() > 1e-5


def test_predict_chunk_input_errors(buffer: ReplayBuffer) -> None:
    policy = build("scd", buffer).eval()
    history = causal_history(policy, buffer, steps=3)
    with pytest.raises(KeyError, match="'action'"):
        policy.predict_chunk({"state": history["state"]})
    with pytest.raises(ValueError, match=r"'action' has shape \(1, 1, 2\); expected \(1, 2, 2\)"):
        policy.predict_chunk({**history, "action": history["action"][:, :1]})
    with pytest.raises(KeyError, match="'state' is missing"):
        policy.predict_chunk({"image": history["state"]})
    with pytest.raises(ValueError, match=r"'state' has shape"):
        policy.predict_chunk({**history, "state": history["state"][..., :2]})


def test_diffusion_policy_pads_a_short_window_with_the_first_observation(buffer: ReplayBuffer) -> None:
    policy = build("diffusion_policy", buffer)
    randomize_zero_init(policy)
    policy.eval()
    first = torch.randn(1, 1, STATE_DIM)
    noise = torch.randn(1, HORIZON, ACTION_DIM)
    short = policy.predict_chunk({"state": first}, noise=noise)
    padded = policy.predict_chunk({"state": first.repeat(1, 2, 1)}, noise=noise)
    torch.testing.assert_close(short, padded, atol=0, rtol=0)


def test_param_groups_scale_decoder_lr_and_skip_decay_on_gains(buffer: ReplayBuffer) -> None:
    policy = build("scd", buffer)
    groups = {g["name"]: g for g in policy.param_groups(1e-3, 0.05)}
    assert set(groups) == {"encoder_decay", "encoder_no_decay", "decoder_decay", "decoder_no_decay"}
    assert groups["decoder_decay"]["lr"] == pytest.approx(2e-3) and groups["encoder_decay"]["lr"] == 1e-3
    assert (
        groups["encoder_no_decay"]["weight_decay"] == 0.0 and groups["decoder_decay"]["weight_decay"] == 0.05
    )
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(policy.named_parameters())
    assert sum(len(v) for v in ids.values()) == len(named)  # every parameter exactly once
    assert id(named["encoder.query_slots"]) in ids["encoder_no_decay"]
    assert id(named["decoder.blocks.0.mod_table"]) in ids["decoder_no_decay"]
    assert id(named["decoder.blocks.0.attn.qkv.weight"]) in ids["decoder_decay"]
    assert id(named["tokenizer.no_prev_action"]) in ids["encoder_no_decay"]
    torch.optim.AdamW(policy.param_groups(1e-3, 0.05))  # accepted as is
    baseline = {g["name"] for g in build("causal_diffusion", buffer).param_groups(1e-3, 0.05)}
    assert baseline == {"encoder_decay", "encoder_no_decay"}


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("policy_type", TYPES)
def test_save_load_gives_identical_actions(policy_type: str, buffer: ReplayBuffer, tmp_path: Path) -> None:
    policy = build(policy_type, buffer, image=True)
    randomize_zero_init(policy)
    policy.eval()
    policy.save_pretrained(tmp_path / "policy")
    record = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert record["policy_type"] == policy_type and record["format_version"] == 1
    assert record["config"]["input_shapes"] == {"state": [STATE_DIM], "image": list(IMAGE)}
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_policy(tmp_path / "policy")
    assert type(loaded) is type(policy) and not loaded.training
    if policy_type == "diffusion_policy":
        history = {"state": torch.randn(1, 2, STATE_DIM), "image": torch.rand(1, 2, *IMAGE)}
    else:
        history = causal_history(policy, buffer, steps=4)
    outs = [
        p.predict_chunk(history, generator=torch.Generator().manual_seed(3), num_inference_steps=3)
        for p in (policy, loaded)
    ]
    assert torch.equal(outs[0], outs[1])
    assert type(type(policy).from_pretrained(tmp_path / "policy")) is type(policy)


def test_checkpoint_errors(buffer: ReplayBuffer, tmp_path: Path) -> None:
    policy = build("causal_diffusion", buffer)
    folder = tmp_path / "policy"
    policy.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="holds a 'causal_diffusion' policy"):
        SeparableCausalDiffusionPolicy.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_policy(tmp_path / "missing")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="damaged"):  # the checksum in config.json catches it
        load_policy(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_policy(folder)
    record = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_policy(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_policy(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_policy(folder)
    # Weights of another architecture: a clear mismatch error.
    other = tmp_path / "other"
    build("scd", buffer).save_pretrained(other)
    record = json.loads((other / "config.json").read_text())
    record["policy_type"] = record["config"]["type"] = "causal_diffusion"
    (other / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not match"):
        load_policy(other)


def test_policy_rejects_mismatched_config_and_normalizer(buffer: ReplayBuffer) -> None:
    normalizer = fit_normalizer(buffer, [0], {"state": "min_max", "action": "min_max"})
    with pytest.raises(ValueError, match=r"config\.type is 'scd'"):
        CausalDiffusionPolicy(tiny_config("scd"), normalizer)
    with pytest.raises(ValueError, match="normaliser has no key 'image'"):
        DiffusionPolicy(tiny_config("diffusion_policy", image=True), normalizer)
    with pytest.raises(ValueError, match="action_dim is not set"):
        make_policy(tiny_config("scd", action_dim=0), normalizer)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("policy_type", [*TYPES, "scd-regression"])
def test_overfits_a_small_dataset(policy_type: str, buffer: ReplayBuffer) -> None:
    torch.manual_seed(0)
    if policy_type == "scd-regression":  # the ablation: the same network, trained by MSE to the chunk
        policy = build("scd", buffer, diffusion=DiffusionConfig(process="regression"))
    else:
        policy = build(policy_type, buffer)
    per_episode = 24 - (policy.config.observation_offsets[-1])  # anchors of each 24-step episode
    batch = batch_of(policy, buffer, list(range(0, 4 * per_episode, max(1, per_episode // 4))))

    def fixed_noise_loss() -> float:
        torch.manual_seed(1234)  # the same times and noise before and after training
        with torch.no_grad():
            return float(policy.compute_loss(batch)[0])

    initial = fixed_noise_loss()
    optimizer = torch.optim.AdamW(policy.param_groups(3e-3, 0.0))
    for _ in range(150):
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = fixed_noise_loss()
    print(f"{policy_type}: loss {initial:.3f} -> {final:.4f}")
    # A regressor starts closer (zero output vs chunks of small variance, not velocities of size ~1).
    assert final < initial / (4 if policy_type == "scd-regression" else 10)
