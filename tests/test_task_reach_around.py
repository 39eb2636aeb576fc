"""reach_around: the multimodal task — expert success, both modes, blocked mean path, determinism."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.tasks import reach_around
from envs.tasks.reach_around import SPEC, ReachAroundEnv, make_expert, push_velocity


def _make(**kwargs: Any) -> gym.Env[Any, Any]:
    return gym.make(SPEC.gym_id, max_episode_steps=SPEC.max_episode_steps, **kwargs)


def _unwrapped(env: gym.Env[Any, Any]) -> ReachAroundEnv:
    inner = env.unwrapped
    assert isinstance(inner, ReachAroundEnv)
    return inner


def test_spec_matches_env() -> None:
    assert SPEC.name == "reach_around"
    assert SPEC.tags == ("own", "multimodal")
    assert SPEC.cameras[0] == "top"
    env = _make()
    space = env.observation_space
    assert isinstance(space, gym.spaces.Dict) and set(space.keys()) == {"state"}
    assert space["state"].shape == (SPEC.state_dim,) == (6,)
    assert env.action_space.shape == (SPEC.action_dim,) == (2,)
    # 0.005 s timestep x 20 substeps = 0.1 s per control step.
    assert _unwrapped(env).control_dt == pytest.approx(1.0 / SPEC.fps)
    env.close()


def test_state_layout_and_initial_ranges() -> None:
    env = _make()
    for seed in range(5):
        obs, info = env.reset(seed=seed)
        inner = _unwrapped(env)
        state = obs["state"]
        assert state.dtype == np.float32
        np.testing.assert_allclose(state[0:2], inner.pusher_xy, atol=1e-6)
        np.testing.assert_allclose(state[2:4], inner.puck_xy, atol=1e-6)
        np.testing.assert_allclose(state[4:6], inner.goal_xy, atol=1e-6)
        # Documented start ranges: puck below the obstacle, goal above it, pusher below the puck.
        assert -0.03 <= state[2] <= 0.03 and -0.17 <= state[3] <= -0.13
        assert -0.03 <= state[4] <= 0.03 and 0.13 <= state[5] <= 0.17
        assert -0.1 <= state[0] <= 0.1 and -0.27 <= state[1] <= -0.23
        assert info == {
            "success": False,
            "steps": 0,
            "passed_side": 0,
            "goal_distance": pytest.approx(float(np.linalg.norm(state[2:4] - state[4:6])), abs=1e-6),
        }
    env.close()


def test_expert_succeeds_and_uses_both_sides() -> None:
    env = _make()
    expert = make_expert(seed=0)
    assert isinstance(expert, reach_around.ReachAroundExpert)
    episodes, successes, sides = 30, 0, []
    for seed in range(episodes):
        obs, info = env.reset(seed=seed)
        terminated = truncated = False
        while not (terminated or truncated):
            action = expert(obs, info)
            assert env.action_space.contains(action)
            obs, reward, terminated, truncated, info = env.step(action)
            assert env.observation_space.contains(obs)
        successes += int(info["success"])
        if info["success"]:
            assert reward == 1.0 and terminated
            assert info["goal_distance"] <= reach_around.GOAL_TOLERANCE
            # The env's record of the side the puck took is the side the expert chose.
            assert info["passed_side"] == expert.side
        sides.append(expert.side)
    assert successes >= 0.95 * episodes
    lefts = sides.count(-1)
    assert sides.count(1) + lefts == episodes
    # 50/50 per episode: 30 draws give 15 +- 2.7, so both modes show up in large numbers.
    assert 9 <= lefts <= 21
    env.close()


def test_expert_side_draws_are_seeded() -> None:
    def sides(seed: int) -> list[int]:
        expert = make_expert(seed)
        assert isinstance(expert, reach_around.ReachAroundExpert)
        obs = {"state": np.zeros(6, dtype=np.float32)}
        out = []
        for _ in range(20):
            expert(obs, {"steps": 0})  # each call with steps == 0 starts an episode: a new draw
            out.append(expert.side)
        return out

    assert sides(3) == sides(3)
    assert sides(3) != sides(4)


def test_averaged_mode_drives_into_the_obstacle() -> None:
    # The mean of the left and right detours is the straight push at the goal: it must fail,
    # the puck ending up stuck below the obstacle.
    env = _make()
    obs, info = env.reset(seed=0)
    terminated = truncated = False
    while not (terminated or truncated):
        state = obs["state"].astype(np.float64)
        velocity = push_velocity(state[0:2], state[2:4], state[4:6], reach_around.MAX_SPEED)
        action = np.clip(velocity / reach_around.MAX_SPEED, -1.0, 1.0)
        obs, _, terminated, truncated, info = env.step(action)
    assert truncated and not info["success"]
    assert info["passed_side"] == 0
    # Obstacle bottom edge at y = -0.02, puck radius 0.03 -> the puck centre stays below -0.05.
    assert obs["state"][3] < -0.05 + 1e-3
    env.close()


def test_determinism_under_a_seed() -> None:
    actions = np.random.default_rng(7).uniform(-1.0, 1.0, (40, 2)).astype(np.float32)

    def rollout(seed: int) -> np.ndarray:
        env = _make()
        obs, _ = env.reset(seed=seed)
        states = [obs["state"]]
        for action in actions:
            obs, *_ = env.step(action)
            states.append(obs["state"])
        env.close()
        return np.stack(states)

    first, second = rollout(11), rollout(11)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first[0], rollout(12)[0])


def test_image_shows_the_scene() -> None:
    env = _make(image=True, image_size=96)
    obs, _ = env.reset(seed=0)
    image = obs["image"]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    red, green, blue = (image[..., c].astype(int) for c in range(3))
    # Camera 0.8 m above the table with fovy 45 deg: the table's half-width 0.3314 m maps to 48 px.
    # The goal (green disc, radius 0.035 m ~ 5 px) sits near (x, y) = (0, 0.15) -> row ~26, col ~48.
    goal = (green > red + 60) & (green > blue + 60)
    rows, cols = np.nonzero(goal)
    assert goal.sum() >= 30
    state = obs["state"]
    px_per_m = 48 / (0.8 * np.tan(np.radians(22.5)))
    assert abs(rows.mean() - (48 - state[5] * px_per_m)) < 2.0
    assert abs(cols.mean() - (48 + state[4] * px_per_m)) < 2.0
    puck = (red > 180) & (blue < 90)  # orange
    assert puck.sum() >= 30
    env.close()


@pytest.mark.filterwarnings("ignore:.*Box observation space m..imum value is .*infinity")
def test_check_env_passes() -> None:
    env = _make(image=True, image_size=64, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    env.close()


def test_expert_rejects_bad_state() -> None:
    with pytest.raises(ValueError, match=r"obs\['state'\] has shape \(4,\)"):
        make_expert(0)({"state": np.zeros(4, dtype=np.float32)}, {"steps": 0})
