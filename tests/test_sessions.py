"""Cross-session batching (``runtime.step_sessions``): separate single-stream runtimes that tick at their
own pace give, tick by tick, the actions each would give alone, for every policy type."""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime import TYPES, K, build, episode

from scd_policy.config import DiffusionConfig
from scd_policy.policies import SeparableCausalDiffusionPolicy
from scd_policy.runtime import (
    ObservationError,
    PolicyRuntime,
    plan_sessions,
    step_sessions,
    step_sessions_deferred,
)


def schedule(n_sessions: int, ticks: int, seed: int) -> np.ndarray:
    """Which sessions tick at each server tick (ticks, n): sessions join late and skip ticks."""
    rng = np.random.default_rng(seed)
    active = rng.random((ticks, n_sessions)) < 0.7
    for session in range(n_sessions):
        active[: 2 * session, session] = False  # staggered starts: caches of different lengths
    return active


# The ancestral DDPM sampler draws per-step noise, so its sessions are sampled one by one (scd covers it).
@pytest.mark.parametrize(("policy_type", "sampler"), [*((t, "euler") for t in TYPES), ("scd", "ddpm")])
def test_batched_sessions_equal_separate_runtimes(policy_type: str, sampler: str) -> None:
    process = "ddpm" if sampler == "ddpm" else "flow"
    policy = build(
        policy_type, diffusion=DiffusionConfig(process=process, sampler=sampler, num_train_timesteps=30)
    )
    n, ticks = 4, 30
    active = schedule(n, ticks, seed=1)
    obs = episode(ticks, n=n, seed=2)["state"]  # session i's j-th observation: obs[j, i]
    served = [PolicyRuntime(policy, num_inference_steps=K, seed=10 + i) for i in range(n)]
    alone = [PolicyRuntime(policy, num_inference_steps=K, seed=10 + i) for i in range(n)]
    count = [0] * n
    batched: list[list[np.ndarray]] = [[] for _ in range(n)]
    for tick in range(ticks):
        rows = np.flatnonzero(active[tick]).tolist()
        results = step_sessions([served[i] for i in rows], [{"state": obs[count[i], i]} for i in rows])
        for i, result in zip(rows, results, strict=True):
            assert isinstance(result, np.ndarray)
            batched[i].append(result)
            count[i] += 1
    for i in range(n):
        expected = np.stack([alone[i].step({"state": obs[j, i]}) for j in range(count[i])])
        np.testing.assert_allclose(np.stack(batched[i]), expected, atol=1e-6, rtol=0)
        assert served[i].steps_taken == count[i]


@pytest.mark.parametrize("policy_type", TYPES)
def test_one_session_ticking_alone_is_bit_identical(policy_type: str) -> None:
    policy = build(policy_type)
    obs = episode(10, seed=3)["state"][:, 0]
    served, alone = PolicyRuntime(policy, num_inference_steps=K), PolicyRuntime(policy, num_inference_steps=K)
    for t in range(10):
        (result,) = step_sessions([served], [{"state": obs[t]}])
        np.testing.assert_array_equal(result, alone.step({"state": obs[t]}))


def test_a_bad_observation_fails_only_its_own_session() -> None:
    policy = build("scd")
    obs = episode(6, n=3, seed=4)["state"]
    served = [PolicyRuntime(policy, num_inference_steps=K, seed=i) for i in range(3)]
    alone = [PolicyRuntime(policy, num_inference_steps=K, seed=i) for i in range(3)]
    for t in range(6):
        inputs = [{"state": obs[t, i]} for i in range(3)]
        if t == 3:
            inputs[1] = {"state": np.full(4, np.nan, np.float32)}
        results = step_sessions(served, inputs)
        for i in range(3):
            if t == 3 and i == 1:
                assert isinstance(results[i], ObservationError)
                assert "NaN" in str(results[i])
                continue
            np.testing.assert_allclose(results[i], alone[i].step(inputs[i]), atol=1e-6, rtol=0)


def test_sessions_must_share_one_policy_and_be_single_stream() -> None:
    first, second = build("scd"), build("scd")
    with pytest.raises(ValueError, match="single-stream runtimes"):
        step_sessions([PolicyRuntime(first), PolicyRuntime(second)], [{"state": np.zeros(4)}] * 2)
    with pytest.raises(ValueError, match="single-stream runtimes"):
        step_sessions([PolicyRuntime(first, num_envs=2)], [{"state": np.zeros((2, 4))}])


def test_deferred_planning_gives_the_same_actions() -> None:
    # With a latency budget the chunk planned at a tick is only used later: a server samples it after
    # sending that tick's replies. The actions are those of plain step() calls.
    policy = build("scd")
    obs = episode(16, n=3, seed=6)["state"]
    served = [PolicyRuntime(policy, num_inference_steps=K, seed=i, latency_ticks=2) for i in range(3)]
    alone = [PolicyRuntime(policy, num_inference_steps=K, seed=i, latency_ticks=2) for i in range(3)]
    deferred_ticks = 0
    for t in range(16):
        results, deferred = step_sessions_deferred(served, [{"state": obs[t, i]} for i in range(3)])
        deferred_ticks += bool(deferred)
        plan_sessions(deferred)
        for i in range(3):
            np.testing.assert_allclose(results[i], alone[i].step({"state": obs[t, i]}), atol=1e-6, rtol=0)
    assert deferred_ticks >= 4  # every replan after the first chunk was deferred


@pytest.mark.parametrize("policy_type", TYPES)
def test_sessions_that_defer_encoding_equal_separate_runtimes(policy_type: str) -> None:
    # defer_encoding: a session that plans nothing only buffers its step, and a replanning tick
    # encodes every session's buffered steps with the batch. Sessions join late and skip ticks, so
    # they buffer different numbers of steps, and context_window = 7 makes long gaps evict.
    policy = build(policy_type)
    n, ticks = 4, 30
    active = schedule(n, ticks, seed=7)
    obs = episode(ticks, n=n, seed=8)["state"]
    served = [PolicyRuntime(policy, num_inference_steps=K, seed=i, defer_encoding=True) for i in range(n)]
    alone = [PolicyRuntime(policy, num_inference_steps=K, seed=i, defer_encoding=True) for i in range(n)]
    plain = [PolicyRuntime(policy, seed=i, num_inference_steps=K) for i in range(n)]
    count = [0] * n
    for tick in range(ticks):
        rows = np.flatnonzero(active[tick]).tolist()
        results = step_sessions([served[i] for i in rows], [{"state": obs[count[i], i]} for i in rows])
        for i, result in zip(rows, results, strict=True):
            assert isinstance(result, np.ndarray)
            step_obs = {"state": obs[count[i], i]}
            np.testing.assert_allclose(result, alone[i].step(step_obs), atol=1e-6, rtol=0)
            np.testing.assert_allclose(result, plain[i].step(step_obs), atol=1e-5, rtol=0)
            count[i] += 1


def test_deferring_sessions_encode_once_per_replanning_tick() -> None:
    # Three lockstep sessions replan every N_EXEC = 3 ticks: the ticks between only tokenize, and each
    # replan is one encoder call over all three sessions' buffered steps.
    policy = build("scd")
    assert isinstance(policy, SeparableCausalDiffusionPolicy)
    calls: list[tuple[int, int]] = []  # (sessions, steps) of every encoder call
    hook = policy.encoder.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[:2]))
    obs = episode(9, n=3, seed=9)["state"]
    served = [PolicyRuntime(policy, num_inference_steps=K, seed=i, defer_encoding=True) for i in range(3)]
    try:
        for t in range(9):
            step_sessions(served, [{"state": obs[t, i]} for i in range(3)])
    finally:
        hook.remove()
    assert calls == [(3, 1), (3, 3), (3, 3)]  # replans at ticks 0, 3, 6; ticks 7 and 8 are buffered
