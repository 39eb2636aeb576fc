"""The deployment runtime: step() equals offline predict_chunk, resets (all and per stream), bounded
memory over 10,000 steps, temporal ensembling, input validation, checkpoint errors, the docs example."""

from __future__ import annotations

import gc
import json
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import scd_policy
from scd_policy.config import DiffusionConfig, PolicyConfig, config_dir
from scd_policy.execution import ChunkQueue
from scd_policy.models.normalizer import Normalizer
from scd_policy.policies import CheckpointError, Policy, SeparableCausalDiffusionPolicy, make_policy
from scd_policy.policies.causal import CausalStreamState
from scd_policy.runtime import ObservationError, PolicyRuntime, TemporalEnsembler, stream_generator

TYPES = ("scd", "causal_diffusion", "diffusion_policy")
STATE_DIM, ACTION_DIM, IMAGE = 4, 2, (3, 8, 8)
HORIZON, N_EXEC, K = 6, 3, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny networks: on a shared 2-core machine thread hand-offs cost more than the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_normalizer(image: bool = False, state_dim: int = STATE_DIM) -> Normalizer:
    rng = np.random.default_rng(0)
    data = {
        "state": rng.normal(0.5, 2.0, size=(64, state_dim)).astype(np.float32),
        "action": rng.uniform(-1.0, 1.0, size=(64, ACTION_DIM)).astype(np.float32),
    }
    modes = {"state": "mean_std", "action": "min_max"}
    if image:
        data["image"] = np.zeros((1, *IMAGE), dtype=np.float32)
        modes["image"] = "image"
    return Normalizer.fit(data, modes)


def build(policy_type: str, image: bool = False, state_dim: int = STATE_DIM, **overrides: Any) -> Policy:
    """A tiny policy whose zero-initialised parts (AdaLN-Zero) are randomised, so its actions depend on
    its inputs and on the noise."""
    size = OmegaConf.to_container(OmegaConf.load(config_dir() / "size" / "tiny.yaml"))
    assert isinstance(size, dict)
    values: dict[str, Any] = {
        **{str(k): v for k, v in size.items()},
        "type": policy_type,
        "horizon": HORIZON,
        "n_action_steps": N_EXEC,
        "train_window": 5,
        "context_window": 7,
        "n_obs_steps": 2,
        "input_shapes": {"state": [state_dim], **({"image": list(IMAGE)} if image else {})},
        "action_dim": ACTION_DIM,
        **overrides,
    }
    policy = make_policy(PolicyConfig(**values), make_normalizer(image, state_dim))
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in policy.parameters():
            if param.dim() >= 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return policy.eval()


def episode(steps: int, n: int = 1, seed: int = 0, image: bool = False) -> dict[str, np.ndarray]:
    """Raw observations (steps, n, ...): states around the normaliser's mean, HWC uint8 frames."""
    rng = np.random.default_rng(seed)
    obs = {"state": rng.normal(0.5, 2.0, size=(steps, n, STATE_DIM)).astype(np.float32)}
    if image:
        c, h, w = IMAGE
        obs["image"] = rng.integers(0, 256, size=(steps, n, h, w, c), dtype=np.uint8)
    return obs


def run(runtime: PolicyRuntime, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Step through (T, N, ...) observations; actions (T, N, Da)."""
    steps = next(iter(obs.values())).shape[0]
    return np.stack([runtime.step({k: v[t] for k, v in obs.items()}) for t in range(steps)])


def to_policy_images(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (..., C, H, W) float in [0, 1], what predict_chunk takes."""
    return torch.from_numpy(np.moveaxis(frames, -1, -3).astype(np.float32) / np.float32(255.0))


# ----------------------------------------------------------------------------- step() == predict_chunk


CASES = [
    ("scd", "euler", False, 0),
    ("scd", "euler", True, 0),
    ("scd", "ddpm", False, 0),  # ancestral DDPM: per-step noise, streams sampled one by one
    ("scd", "euler", False, 2),  # past-token prediction: the chunk starts 2 steps back
    ("causal_diffusion", "euler", False, 0),
    ("diffusion_policy", "euler", False, 0),
    ("diffusion_policy", "ddim", True, 0),
]


@pytest.mark.parametrize(("policy_type", "sampler", "image", "past_actions"), CASES)
def test_step_equals_predict_chunk_on_the_same_history_and_noise(
    policy_type: str, sampler: str, image: bool, past_actions: int
) -> None:
    process = "flow" if sampler == "euler" else "ddpm"
    diffusion = DiffusionConfig(process=process, sampler=sampler, num_train_timesteps=30)
    extra = {"past_actions": past_actions} if past_actions else {}
    policy = build(policy_type, image=image, diffusion=diffusion, **extra)
    steps, seed = 11, 7  # 11 > context_window = 7: eviction is in play for the causal policies
    obs = episode(steps, image=image)
    runtime = PolicyRuntime(policy, num_inference_steps=K, seed=seed)
    actions = run(runtime, {k: v[:, 0] for k, v in obs.items()})  # unbatched input -> (T, Da)
    assert actions.shape == (steps, ACTION_DIM) and actions.dtype == np.float32

    generator = stream_generator(seed, 0)  # replayed in the same order: one draw sequence per replan
    history: dict[str, torch.Tensor] = {"state": torch.from_numpy(obs["state"][:, 0][None])}  # (1, T, 4)
    if image:
        history["image"] = to_policy_images(obs["image"][:, 0][None])
    offset = -policy.config.chunk_start_offset  # the chunk starts n_obs_steps - 1 / past_actions back
    replans = 0
    for t in range(0, steps, N_EXEC):
        past = {key: value[:, : t + 1] for key, value in history.items()}
        if policy.config.is_causal:
            past["action"] = torch.from_numpy(actions[None, :t])  # what the runtime executed
        chunk = policy.predict_chunk(past, num_inference_steps=K, generator=generator)[0].numpy()
        queued = actions[t : t + N_EXEC]
        np.testing.assert_allclose(queued, chunk[offset : offset + len(queued)], atol=2e-5, rtol=0)
        replans += 1
    assert replans == 4
    # The noise matters: another seed gives other actions.
    other = run(
        PolicyRuntime(policy, num_inference_steps=K, seed=seed + 1), {k: v[:, 0] for k, v in obs.items()}
    )
    assert np.abs(other - actions).max() > 1e-3


def test_scd_runs_the_encoder_once_per_step_on_the_new_step_only() -> None:
    policy = build("scd")
    assert isinstance(policy, SeparableCausalDiffusionPolicy)
    new_steps: list[int] = []
    decoder_calls = [0]
    hooks = [
        policy.encoder.register_forward_pre_hook(lambda _, args: new_steps.append(args[0].shape[1])),
        policy.decoder.register_forward_hook(lambda *_: decoder_calls.__setitem__(0, decoder_calls[0] + 1)),
    ]
    try:
        run(PolicyRuntime(policy, num_inference_steps=4), {"state": episode(9)["state"][:, 0]})
    finally:
        for hook in hooks:
            hook.remove()
    assert new_steps == [1] * 9  # one call per tick, one step of tokens (the cache holds the rest)
    assert decoder_calls[0] == 3 * 4  # 3 replans (ticks 0, 3, 6) x K = 4


@pytest.mark.parametrize("policy_type", TYPES)
def test_deferred_encoding_gives_the_same_actions(policy_type: str) -> None:
    # defer_encoding: ticks without a replan only tokenize; the next replan encodes the buffered steps in
    # one call. Same actions (float32 rounding), including a per-stream reset while steps are buffered
    # (stream 0 at tick 7, between replans at ticks 6 and 9) and a window that evicts (7 steps).
    policy = build(policy_type)
    obs = episode(16, n=3, seed=4)

    def actions(defer: bool) -> np.ndarray:
        runtime = PolicyRuntime(policy, num_envs=3, num_inference_steps=K, seed=1, defer_encoding=defer)
        out = []
        for t in range(16):
            if t == 7:
                runtime.reset(np.array([True, False, False]))
            out.append(runtime.step({k: v[t] for k, v in obs.items()}))
        return np.stack(out)

    np.testing.assert_allclose(actions(True), actions(False), atol=1e-5, rtol=0)


def test_deferred_encoding_encodes_the_buffered_steps_at_the_replan() -> None:
    policy = build("scd")
    assert isinstance(policy, SeparableCausalDiffusionPolicy)
    new_steps: list[int] = []
    hook = policy.encoder.register_forward_pre_hook(lambda _, args: new_steps.append(args[0].shape[1]))
    try:
        runtime = PolicyRuntime(policy, num_inference_steps=K, defer_encoding=True)
        run(runtime, {"state": episode(9)["state"]})
        state = runtime._state
        assert new_steps == [1, 3, 3]  # replans at ticks 0, 3, 6; ticks 7 and 8 wait for the next one
        assert isinstance(state, CausalStreamState) and len(state.pending) == 2 and state.nbytes() > 0
        # Observing without ever sampling buffers at most one window (context_window = 7).
        with torch.inference_mode():  # the runtime's state tensors are inference tensors
            for _ in range(20):
                policy.observe(
                    state,
                    {"state": torch.randn(1, STATE_DIM)},
                    torch.zeros(1, ACTION_DIM),
                    torch.ones(1, dtype=torch.bool),
                    defer=True,
                )
                assert len(state.pending) < 7
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- resets


@pytest.mark.parametrize("policy_type", TYPES)
def test_reset_clears_every_piece_of_episode_state(policy_type: str) -> None:
    policy = build(policy_type)
    first, second = episode(8, seed=1), episode(8, seed=2)
    runtime = PolicyRuntime(policy, num_inference_steps=K, seed=3)
    run(runtime, first)
    noise_state = runtime.generators[0].get_state()
    runtime.reset()  # state cleared, generators keep running
    after_reset = run(runtime, second)

    fresh = PolicyRuntime(policy, num_inference_steps=K, seed=3)
    fresh.generators[0].set_state(noise_state)
    np.testing.assert_array_equal(after_reset, run(fresh, second))

    runtime.reset(seed=3)  # also re-seeded: exactly a fresh runtime
    np.testing.assert_array_equal(
        run(runtime, second), run(PolicyRuntime(policy, num_inference_steps=K, seed=3), second)
    )

    # Without a reset the history (or the window) and the queue carry over: other actions.
    carried = PolicyRuntime(policy, num_inference_steps=K, seed=3)
    run(carried, first)
    carried.generators[0].set_state(noise_state)
    assert np.abs(run(carried, second) - after_reset).max() > 1e-4


@pytest.mark.parametrize("policy_type", TYPES)
def test_per_env_reset_only_affects_that_env(policy_type: str) -> None:
    policy = build(policy_type)
    steps, at = 12, 5  # the reset comes mid-queue for the other streams (they replan at 0, 3, 6, 9)
    obs = episode(steps, n=3, seed=4)
    plain = run(PolicyRuntime(policy, num_envs=3, num_inference_steps=K, seed=0), obs)

    runtime = PolicyRuntime(policy, num_envs=3, num_inference_steps=K, seed=0)
    new_episode = episode(steps - at, n=3, seed=5)
    mixed = {key: value.copy() for key, value in obs.items()}
    mixed["state"][at:, 1] = new_episode["state"][:, 1]
    actions = []
    for t in range(steps):
        if t == at:
            runtime.reset(np.array([False, True, False]), seed=9)
        actions.append(runtime.step({key: value[t] for key, value in mixed.items()}))
    with_reset = np.stack(actions)

    # Streams 0 and 2: unchanged (up to float rounding of a different batch composition).
    np.testing.assert_allclose(with_reset[:, [0, 2]], plain[:, [0, 2]], atol=2e-5, rtol=0)
    assert np.abs(with_reset[at:, 1] - plain[at:, 1]).max() > 1e-3
    # Stream 1 after its reset: exactly a fresh stream 1 (seed 9) that only ever saw the new episode.
    fresh = run(PolicyRuntime(policy, num_envs=3, num_inference_steps=K, seed=9), new_episode)
    np.testing.assert_allclose(with_reset[at:, 1], fresh[:, 1], atol=2e-5, rtol=0)


def test_reset_mask_shape_is_checked() -> None:
    runtime = PolicyRuntime(build("scd"), num_envs=2)
    with pytest.raises(ValueError, match=r"reset mask has shape \(3,\); expected \(2,\)"):
        runtime.reset([True, False, True])


# ----------------------------------------------------------------------------- long episodes


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes held by the storages behind the tensors (views of one storage counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _runtime_tensors(runtime: PolicyRuntime) -> list[torch.Tensor]:
    cache = runtime._state.cache
    assert cache is not None and cache.valid is not None
    executor = runtime._executor
    assert isinstance(executor, ChunkQueue)
    state = [executor.chunk, executor.pending, executor.old, runtime._prev_action, runtime._prev_valid]
    return [*cache.keys, *cache.values, cache.valid, *state]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_is_flat_over_a_10000_step_episode() -> None:
    policy = build(
        "scd", d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1, context_window=8, train_window=4
    )
    runtime = PolicyRuntime(policy, n_action_steps=HORIZON, num_inference_steps=1, latency_window=500)
    states = np.random.default_rng(0).normal(size=(97, STATE_DIM)).astype(np.float32)
    sizes, rss = {}, {}
    for t in range(1, 10_001):
        runtime.step({"state": states[t % 97]})
        if t in (1_000, 10_000):
            gc.collect()
            sizes[t], rss[t] = _storage_bytes(_runtime_tensors(runtime)), _rss_bytes()
        if t == 9_000:
            tracemalloc.start()  # tracing slows every allocation down: the last 1,000 steps only
    heap_growth = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert runtime._state.cache.n_steps == 8  # the window, not the episode
    assert sizes[10_000] == sizes[1_000]  # the cache and the state tensors: the same bytes
    # Python objects still alive from the last 1,000 steps: a leak of 64 bytes per step would show.
    assert heap_growth < 64_000, heap_growth
    # The process does not grow by more than allocator noise (1 KB per step would be 9 MB).
    assert rss[10_000] - rss[1_000] < 8_000_000, rss
    assert len(runtime.latencies_ms) == 500 and runtime.steps_taken == 10_000
    assert runtime.latency_stats()["steps"] == 500


# ----------------------------------------------------------------------------- temporal ensembling


@pytest.mark.parametrize("every_stream", [False, True])  # rows given, or None (the in-place path)
def test_temporal_ensembling_hand_computed(every_stream: bool) -> None:
    # Chunk sampled at tick s predicts 10 s + i for tick s + i (L = 3).
    def chunk(s: int) -> torch.Tensor:
        return torch.tensor([[[10.0 * s], [10.0 * s + 1], [10.0 * s + 2]]])

    rows = None if every_stream else torch.tensor([0])
    plain = TemporalEnsembler(1, 3, 1, decay=0.0, device=torch.device("cpu"))
    got = [float(plain.add(rows, chunk(s))) for s in range(5)]
    # tick 0: chunk 0 only; tick 1: (1 + 10) / 2; tick 2: (2 + 11 + 20) / 3; later: the last three.
    assert got == pytest.approx([0.0, 5.5, 11.0, 21.0, 31.0])
    halving = TemporalEnsembler(1, 3, 1, decay=float(np.log(2.0)), device=torch.device("cpu"))
    got = [float(halving.add(rows, chunk(s))) for s in range(3)]
    # ACT weights: the oldest chunk 1, the next 1/2, the next 1/4.
    assert got == pytest.approx([0.0, (1 + 0.5 * 10) / 1.5, (2 + 0.5 * 11 + 0.25 * 20) / 1.75])
    # Per-stream reset: stream 1 starts over, stream 0 keeps its chunks.
    two = TemporalEnsembler(2, 3, 1, decay=0.0, device=torch.device("cpu"))
    both = None if every_stream else torch.tensor([0, 1])
    two.add(both, torch.cat([chunk(0), chunk(0)]))
    two.reset(torch.tensor([False, True]))
    assert two.add(both, torch.cat([chunk(1), chunk(1)]))[:, 0].tolist() == pytest.approx([5.5, 10.0])
    # A tick without a chunk for stream 0: it is served from the chunks in play (ticks 2: 2 and 11),
    # and the ticks after it weigh the chunks that are there, on either path.
    two.add(both, torch.cat([chunk(2), chunk(2)]), has_chunk=torch.tensor([False, True]))
    assert two.add(both, torch.cat([chunk(3), chunk(3)]))[:, 0].tolist() == pytest.approx(
        [(12 + 30) / 2, (12 + 21 + 30) / 3]
    )


@pytest.mark.parametrize("policy_type", ["scd", "diffusion_policy"])
def test_replan_every_step_with_decay_zero_averages_the_overlapping_chunks(policy_type: str) -> None:
    policy = build(policy_type)
    steps = 9
    obs = episode(steps, seed=6)["state"][:, 0]
    runtime = PolicyRuntime(policy, num_inference_steps=K, replan_every_step=True, ensemble_decay=0.0, seed=2)
    actions = run(runtime, {"state": obs})
    # Offline: the chunk of every tick from the same history and noise, from the current tick on.
    generator = stream_generator(2, 0)
    offset = -policy.config.chunk_start_offset
    chunks = []
    for t in range(steps):
        past = {"state": torch.from_numpy(obs[None, : t + 1])}
        if policy.config.is_causal:
            past["action"] = torch.from_numpy(actions[None, :t])
        chunks.append(
            policy.predict_chunk(past, num_inference_steps=K, generator=generator)[0, offset:].numpy()
        )
    length = len(chunks[0])  # 6 (scd) or 5 (diffusion_policy: horizon - n_obs_steps + 1)
    for t in range(steps):
        overlapping = [chunks[s][t - s] for s in range(max(0, t - length + 1), t + 1)]
        np.testing.assert_allclose(actions[t], np.mean(overlapping, axis=0), atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- validation


def test_bad_observations_raise_a_clear_error_and_leave_the_state_alone() -> None:
    policy = build("scd", image=True)
    good = episode(4, image=True)
    one = {key: value[0, 0] for key, value in good.items()}  # state (4,), image (8, 8, 3) uint8
    runtime = PolicyRuntime(policy, num_inference_steps=K)
    cases: list[tuple[Any, str]] = [
        (
            {"state": one["state"]},
            r"missing 'image': expected shape \(3, 8, 8\) \(CHW\) or \(8, 8, 3\) \(HWC\)",
        ),
        ({**one, "depth": one["state"]}, r"unexpected \['depth'\]"),
        ({**one, "state": np.zeros(5)}, r"observation 'state' has shape \(5,\); expected \(4,\)"),
        ({**one, "state": np.zeros((2, 4))}, r"'state' has shape \(2, 4\); expected \(4,\)"),
        (
            {**one, "image": np.zeros((8, 8), dtype=np.uint8)},
            r"'image' has shape \(8, 8\); expected \(3, 8, 8\)",
        ),
        ({**one, "state": np.array(["a", "b", "c", "d"])}, r"'state' has dtype <U1; expected a real numeric"),
        ({**one, "state": np.zeros(4, dtype=complex)}, r"'state' has dtype complex128"),
        ({**one, "state": [1.0, [2.0, 3.0], 4.0, 5.0]}, r"'state' is not an array"),
        ({**one, "state": np.array([0.0, np.nan, 0.0, 0.0])}, r"'state' contains NaN or inf"),
        ({**one, "state": torch.tensor([0.0, 0.0, float("inf"), 0.0])}, r"'state' contains NaN or inf"),
        (
            {**one, "image": np.full(IMAGE, 255.0)},
            r"'image' is a float CHW image with values in \[255, 255\]",
        ),
        ([one["state"]], r"takes a dict of observations \['image', 'state'\]; got list"),
    ]
    for obs, message in cases:
        with pytest.raises(ObservationError, match=message):
            runtime.step(obs)
    assert runtime.steps_taken == 0 and issubclass(ObservationError, ValueError)
    # The failed calls changed nothing: the episode matches a fresh runtime's.
    np.testing.assert_array_equal(run(runtime, good), run(PolicyRuntime(policy, num_inference_steps=K), good))

    batched = PolicyRuntime(policy, num_envs=2)
    two = {key: value[0] for key, value in episode(1, n=2, image=True).items()}
    with pytest.raises(ObservationError, match=r"'state' has shape \(4,\); expected \(2, 4\)"):
        batched.step({**two, "state": two["state"][0]})
    with pytest.raises(ObservationError, match=r"'image' has shape \(3, 8, 8, 3\); expected \(2, 3, 8, 8\)"):
        batched.step({**two, "image": np.zeros((3, 8, 8, 3), dtype=np.uint8)})


def test_image_layouts_and_input_types_agree() -> None:
    policy = build("scd", image=True)
    obs = episode(3, image=True)
    hwc_uint8 = run(PolicyRuntime(policy, num_inference_steps=K), obs)
    chw = {"state": obs["state"], "image": np.moveaxis(obs["image"], -1, -3)}
    chw_uint8 = run(PolicyRuntime(policy, num_inference_steps=K), chw)
    chw_float = run(
        PolicyRuntime(policy, num_inference_steps=K), {**chw, "image": chw["image"] / np.float32(255)}
    )
    tensors = run(
        PolicyRuntime(policy, num_inference_steps=K), {k: torch.from_numpy(v) for k, v in obs.items()}
    )
    np.testing.assert_array_equal(hwc_uint8, chw_uint8)
    np.testing.assert_allclose(hwc_uint8, chw_float, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(hwc_uint8, tensors)
    # A leading axis of 1 is accepted for one stream and kept on the output; float64 states are fine.
    runtime = PolicyRuntime(policy, num_inference_steps=K)
    action = runtime.step({"state": obs["state"][0].astype(np.float64), "image": obs["image"][0]})
    assert action.shape == (1, ACTION_DIM) and action.dtype == np.float32
    np.testing.assert_allclose(action, hwc_uint8[0], atol=1e-6, rtol=0)


def test_constructor_arguments_are_checked() -> None:
    policy = build("diffusion_policy")
    with pytest.raises(ValueError, match=r"n_action_steps=6 must be in \[1, 5\]"):
        PolicyRuntime(policy, n_action_steps=6)  # its chunk starts n_obs_steps - 1 = 1 tick back
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        PolicyRuntime(policy, num_envs=0)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        PolicyRuntime(policy, num_inference_steps=0)


# ----------------------------------------------------------------------------- loading, latency


def test_from_pretrained_and_checkpoint_errors(tmp_path: Path) -> None:
    policy = build("causal_diffusion")
    folder = tmp_path / "policy"
    policy.save_pretrained(folder)
    runtime = scd_policy.PolicyRuntime.from_pretrained(folder, num_inference_steps=K, n_action_steps=2)
    assert runtime.config.type == "causal_diffusion" and runtime.n_action_steps == 2
    np.testing.assert_array_equal(
        run(runtime, episode(4)),
        run(PolicyRuntime(policy, num_inference_steps=K, n_action_steps=2), episode(4)),
    )
    assert (
        PolicyRuntime.from_pretrained(folder, policy_type="causal_diffusion").config.type
        == "causal_diffusion"
    )
    with pytest.raises(CheckpointError, match="holds a 'causal_diffusion' policy"):
        PolicyRuntime.from_pretrained(folder, policy_type="scd")
    record = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**record, "format_version": 2}))
    with pytest.raises(CheckpointError, match="format_version 2; this scd-policy reads version 1"):
        PolicyRuntime.from_pretrained(folder)
    act = {**record, "policy_type": "act", "config": {**record["config"], "type": "act"}}
    (folder / "config.json").write_text(json.dumps(act))  # a policy type this library does not know
    with pytest.raises(CheckpointError, match=r"invalid config: policy\.type='act'"):
        PolicyRuntime.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no such directory"):
        PolicyRuntime.from_pretrained(tmp_path / "missing")


def test_latency_stats() -> None:
    runtime = PolicyRuntime(build("scd"), num_inference_steps=K, latency_window=4)
    run(runtime, episode(3))
    assert len(runtime.latencies_ms) == 3 and all(v > 0 for v in runtime.latencies_ms)
    assert runtime.latency_stats(warmup=1)["steps"] == 2
    run(runtime, episode(9))
    stats = runtime.latency_stats(warmup=5)  # the first 5 of 12 ticks are already out of the window
    assert stats["steps"] == 4 and list(runtime.latencies_ms) == list(runtime.latencies_ms)[-4:]
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["mean_ms"] == pytest.approx(np.mean(list(runtime.latencies_ms)))
    assert runtime.latency_stats(warmup=10)["steps"] == 2
    runtime.reset()  # the log spans episodes
    assert len(runtime.latencies_ms) == 4


# ----------------------------------------------------------------------------- the docs example


def test_docs_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).parents[1] / "docs" / "deployment.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    example = code.group(1)
    assert len(example.strip().splitlines()) <= 16
    folder = re.search(r'from_pretrained\("([^"]+)"', example)
    assert folder is not None
    # A tiny, untrained SCD policy for reach_around's state (6,) and action (2,).
    build("scd", state_dim=6).save_pretrained(tmp_path / folder.group(1))
    monkeypatch.chdir(tmp_path)
    printed: list[Any] = []
    namespace: dict[str, Any] = {"print": printed.append}
    exec(compile(example, "docs/deployment.md", "exec"), namespace)
    runtime = namespace["policy"]
    assert isinstance(runtime, PolicyRuntime) and runtime.steps_taken >= 1
    assert printed and printed[0]["p50_ms"] > 0


def test_deploying_a_policy_does_not_import_the_data_layer() -> None:
    # The normaliser belongs to the policy: a robot loading one needs neither zarr nor the dataset code.
    import subprocess
    import sys

    code = (
        "import sys; from scd_policy.runtime import PolicyRuntime; "
        "print(sorted(m for m in sys.modules if m == 'zarr' or m.startswith('scd_policy.data')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
