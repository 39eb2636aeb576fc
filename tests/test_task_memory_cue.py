"""memory_cue: the memory task — the cue shows only early, never leaks later, and decides success."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.tasks import memory_cue
from envs.tasks.memory_cue import CUE_STEPS, PADS, SPEC, MemoryCueEnv, make_expert

# Camera 0.8 m above the floor with fovy 45 deg: the half-width 0.3314 m maps to half the image.
PX_PER_M = 48 / (0.8 * np.tan(np.radians(22.5)))  # at 96 px
# Pad centres (+-0.18, 0.18) -> pixel (row, col) = (48 - 0.18 * PX_PER_M, 48 -+ 0.18 * PX_PER_M).
PAD_PIXELS = [
    (round(48 - 0.18 * PX_PER_M), round(48 - 0.18 * PX_PER_M)),
    (round(48 - 0.18 * PX_PER_M), round(48 + 0.18 * PX_PER_M)),
]


def _make(**kwargs: Any) -> gym.Env[Any, Any]:
    return gym.make(SPEC.gym_id, max_episode_steps=SPEC.max_episode_steps, **kwargs)


def _expert_rollout(
    env: gym.Env[Any, Any], seed: int, cue: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the expert with a forced cue; returns the observations and the last info."""
    expert = make_expert(seed=0)
    obs, info = env.reset(seed=seed, options={"cue": cue})
    observations = [obs]
    terminated = truncated = False
    while not (terminated or truncated):
        obs, _, terminated, truncated, info = env.step(expert(obs, info))
        observations.append(obs)
    return observations, info


def test_spec_matches_env() -> None:
    assert SPEC.name == "memory_cue"
    assert SPEC.tags == ("own", "memory")
    assert SPEC.cameras[0] == "top"
    env = _make()
    inner = env.unwrapped
    assert isinstance(inner, MemoryCueEnv)
    space = env.observation_space
    assert isinstance(space, gym.spaces.Dict) and set(space.keys()) == {"state"}
    assert space["state"].shape == (SPEC.state_dim,) == (6,)
    assert env.action_space.shape == (SPEC.action_dim,) == (2,)
    assert inner.control_dt == pytest.approx(1.0 / SPEC.fps)
    env.close()


def test_expert_success_over_seeded_episodes() -> None:
    env = _make()
    expert = make_expert(seed=0)
    episodes, successes, cues = 30, 0, []
    for seed in range(episodes):
        obs, info = env.reset(seed=seed)
        cues.append(info["cue"])
        terminated = truncated = False
        while not (terminated or truncated):
            obs, _, terminated, truncated, info = env.step(expert(obs, info))
            assert env.observation_space.contains(obs)
        successes += int(info["success"])
        assert info["wrong_target"] is not info["success"]
    assert successes >= 0.95 * episodes
    # The cue is a fair coin under the env seed: 30 draws give 15 +- 2.7.
    assert 9 <= cues.count(0) <= 21
    env.close()


def test_cue_in_state_only_during_the_window() -> None:
    env = _make()
    for cue in (0, 1):
        observations, info = _expert_rollout(env, seed=3, cue=cue)
        assert info["success"] and info["cue"] == cue
        expected = np.eye(2, dtype=np.float32)[cue]
        for step, obs in enumerate(observations):
            cue_part = obs["state"][4:6]
            np.testing.assert_array_equal(cue_part, expected if step < CUE_STEPS else np.zeros(2))
    env.close()


def test_nothing_leaks_the_cue_at_the_decision_point() -> None:
    # Two episodes that differ only in the cue: everything before the decision point (just above
    # the gate) must be identical once the cue is hidden — state and image — so a policy that sees
    # the last two observations there cannot tell the cues apart.
    env = _make(image=True, image_size=96)
    left, _ = _expert_rollout(env, seed=5, cue=0)
    right, _ = _expert_rollout(env, seed=5, cue=1)
    for step in range(CUE_STEPS):
        # During the window: same position, different cue entries and a different lit pad.
        np.testing.assert_array_equal(left[step]["state"][:4], right[step]["state"][:4])
        assert not np.array_equal(left[step]["state"][4:], right[step]["state"][4:])
        assert not np.array_equal(left[step]["image"], right[step]["image"])
    first_difference = next(
        step
        for step in range(CUE_STEPS, min(len(left), len(right)))
        if not np.array_equal(left[step]["state"], right[step]["state"])
    )
    decision = first_difference - 1  # the last observation before the paths split
    assert decision >= CUE_STEPS + 2
    # The split happens above the gate: the wall is at y = 0 with half-thickness 0.01.
    assert left[decision]["state"][1] > 0.04
    for step in range(CUE_STEPS, decision + 1):
        np.testing.assert_array_equal(left[step]["state"], right[step]["state"])
        np.testing.assert_array_equal(left[step]["image"], right[step]["image"])
    env.close()


def test_image_shows_the_lit_pad_only_early() -> None:
    env = _make(image=True, image_size=96)
    for cue in (0, 1):
        observations, _ = _expert_rollout(env, seed=1, cue=cue)
        for step in (0, CUE_STEPS - 1, CUE_STEPS, CUE_STEPS + 5):
            image = observations[step]["image"].astype(int)
            for pad, (row, col) in enumerate(PAD_PIXELS):
                red, green, blue = image[row, col]
                lit = green > red + 80 and green > blue + 80
                assert lit == (step < CUE_STEPS and pad == cue), (cue, step, pad, image[row, col])
    env.close()


def test_wrong_pad_terminates_as_failure_and_right_pad_succeeds() -> None:
    env = _make()
    for target in (0, 1):
        obs, info = env.reset(seed=2, options={"cue": 0})
        route = [np.array([0.0, -0.06]), np.array([0.0, 0.06]), PADS[target]]
        terminated = truncated = False
        reward: SupportsFloat = 0.0
        while not (terminated or truncated):
            position = obs["state"][:2].astype(np.float64)
            if len(route) > 1 and np.linalg.norm(route[0] - position) < 0.015:
                route.pop(0)
            action = np.clip(8.0 * (route[0] - position) / memory_cue.MAX_SPEED, -1.0, 1.0)
            obs, reward, terminated, truncated, info = env.step(action)
        assert terminated and not truncated
        assert np.linalg.norm(obs["state"][:2] - PADS[target]) <= memory_cue.PAD_RADIUS
        if target == 0:
            assert info["success"] and not info["wrong_target"] and reward == 1.0
        else:
            assert not info["success"] and info["wrong_target"] and reward == 0.0
    env.close()


def test_determinism_and_forced_cue_keeps_start() -> None:
    actions = np.random.default_rng(7).uniform(-1.0, 1.0, (30, 2)).astype(np.float32)

    def rollout(seed: int, options: dict[str, Any] | None = None) -> np.ndarray:
        env = _make()
        obs, _ = env.reset(seed=seed, options=options)
        states = [obs["state"]]
        for action in actions:
            obs, _, terminated, truncated, _ = env.step(action)
            states.append(obs["state"])
            if terminated or truncated:
                break
        env.close()
        return np.stack(states)

    np.testing.assert_array_equal(rollout(4), rollout(4))
    assert not np.array_equal(rollout(4)[0, :2], rollout(5)[0, :2])
    # Forcing the cue changes only the cue entries, never the start position.
    forced = [rollout(4, {"cue": cue})[0] for cue in (0, 1)]
    np.testing.assert_array_equal(forced[0][:4], forced[1][:4])
    np.testing.assert_array_equal(forced[0][4:], [1.0, 0.0])
    np.testing.assert_array_equal(forced[1][4:], [0.0, 1.0])


def test_bad_cue_option_is_rejected() -> None:
    env = _make()
    with pytest.raises(ValueError, match="reset option 'cue' must be 0"):
        env.reset(seed=0, options={"cue": 2})
    env.close()


@pytest.mark.filterwarnings("ignore:.*Box observation space m..imum value is .*infinity")
def test_check_env_passes() -> None:
    env = _make(image=True, image_size=64, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    env.close()
