"""``step()`` under bad observations: NaN, inf, values beyond float32, absurdly large finite values, and a
policy that produces NaN. The stream's state must never be poisoned: after a refused observation the
next valid ones give exactly the actions of a stream that never saw it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scd_policy.policies import load_policy
from scd_policy.runtime import ObservationError, PolicyOutputError, PolicyRuntime

pytestmark = pytest.mark.slow

STEPS = 12


def _observations(run_dir: Path) -> list[np.ndarray]:
    policy = load_policy(run_dir / "checkpoints" / "step_00000004" / "policy")
    dim = policy.config.input_shapes["state"][0]
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.2, 0.2, size=dim).astype(np.float32) for _ in range(STEPS)]


def _runtime(run_dir: Path) -> PolicyRuntime:
    policy = load_policy(run_dir / "checkpoints" / "step_00000004" / "policy")
    return PolicyRuntime(policy, seed=0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.float64(1e39), "NaN or inf"),  # finite in float64, inf once cast: checked after the cast
        (np.float32(1e20), "training ranges away"),  # finite float32 that made the network give NaN
        (np.nan, "NaN or inf"),
        (-np.inf, "NaN or inf"),
    ],
)
def test_bad_observation_is_refused_and_leaves_no_trace(trained_run: Path, bad: float, message: str) -> None:
    observations = _observations(trained_run)
    clean, attacked = _runtime(trained_run), _runtime(trained_run)
    expected = [clean.step({"state": obs}) for obs in observations]
    got = []
    for tick, obs in enumerate(observations):
        if tick in (3, 4):  # a replan tick (n_action_steps=4: ticks 0, 4, 8) and an open-loop one
            poisoned = obs.astype(np.float64)
            poisoned[0] = bad
            with pytest.raises(ObservationError, match=message) as caught:
                attacked.step({"state": poisoned})
            assert "'state'" in str(caught.value)
        got.append(attacked.step({"state": obs}))
    for want, have in zip(expected, got, strict=True):
        assert np.isfinite(have).all()
        np.testing.assert_array_equal(want, have)


def test_non_finite_action_resets_the_stream_and_is_never_fed_back(trained_run: Path) -> None:
    runtime = _runtime(trained_run)
    observations = _observations(trained_run)
    runtime.step({"state": observations[0]})
    # Break the network so that it outputs NaN (a stand-in for any numerical failure inside it).
    weights = dict(runtime.policy.named_parameters())
    name = next(key for key in weights if key.endswith("weight") and weights[key].dim() == 2)
    saved = weights[name].detach().clone()
    with torch.no_grad():
        weights[name].fill_(float("nan"))
    with pytest.raises(PolicyOutputError, match=r"NaN/inf actions for stream\(s\) \[0\]"):
        for obs in observations[1:]:
            runtime.step({"state": obs})
    assert torch.isfinite(runtime._prev_action).all()
    assert not bool(runtime._prev_valid.any())  # the stream starts a new episode
    with torch.no_grad():
        weights[name].copy_(saved)
    # Repaired, the stream goes on as a fresh one: the same actions as a new runtime.
    fresh = _runtime(trained_run)
    fresh_actions = [fresh.step({"state": obs}) for obs in observations[:4]]
    runtime.reset(seed=0)
    for obs, want in zip(observations[:4], fresh_actions, strict=True):
        np.testing.assert_array_equal(runtime.step({"state": obs}), want)
