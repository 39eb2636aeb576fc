"""The contract every registered task keeps (ours and Meta-World's), checked on the real simulators.

Steps are limited so the whole file stays fast; the expert test runs full episodes.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.base import MujocoTaskEnv
from envs.registry import get_task, make_env, make_expert, task_names

TASKS = task_names()
STEPS = 25  # random-action steps for the determinism / space checks


def _random_actions(env: gym.Env[Any, Any], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = env.action_space.shape
    assert shape is not None
    return [rng.uniform(-1.0, 1.0, shape).astype(np.float32) for _ in range(n)]


def _rollout(env: gym.Env[Any, Any], seed: int, actions: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    obs, _ = env.reset(seed=seed)
    observations = [obs]
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        if terminated or truncated:
            break
    return observations


def test_registry_lists_every_kind_of_task() -> None:
    # The protocol needs Meta-World tasks plus our own multimodal and memory tasks.
    assert task_names("metaworld"), "no Meta-World task registered"
    assert task_names("multimodal"), "no multimodal task registered"
    assert task_names("memory"), "no memory task registered"
    assert set(task_names("metaworld")) | set(task_names("own")) <= set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_spec_matches_env(task: str) -> None:
    spec = get_task(task)
    env = make_env(task)
    try:
        obs, info = env.reset(seed=0)
        assert env.observation_space["state"].shape == (spec.state_dim,)
        assert obs["state"].shape == (spec.state_dim,) and obs["state"].dtype == np.float32
        assert env.action_space.shape == (spec.action_dim,)
        assert np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)
        assert env.spec is not None and env.spec.max_episode_steps == spec.max_episode_steps
        assert env.metadata["render_fps"] == spec.fps  # one control rate, stated once
        if isinstance(env.unwrapped, MujocoTaskEnv):  # our own tasks: the physics runs at that rate
            assert env.unwrapped.control_dt == pytest.approx(1.0 / spec.fps)
        assert spec.cameras and spec.success and spec.tags
        assert info["steps"] == 0 and info["success"] is False  # experts detect new episodes this way
    finally:
        env.close()


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_actions_same_observations(task: str) -> None:
    env_a, env_b = make_env(task), make_env(task)
    try:
        actions = _random_actions(env_a, STEPS, seed=1)
        first = _rollout(env_a, 7, actions)
        second = _rollout(env_b, 7, actions)
        assert len(first) == len(second)
        for obs_a, obs_b in zip(first, second, strict=True):
            np.testing.assert_array_equal(obs_a["state"], obs_b["state"])
            assert env_a.observation_space.contains(obs_a)
        # Reusing one env (after other episodes) must not change what a seed gives.
        _rollout(env_a, 8, actions[:3])
        np.testing.assert_array_equal(_rollout(env_a, 7, [])[0]["state"], first[0]["state"])
        # A different seed gives a different initial scene.
        assert not np.array_equal(_rollout(env_b, 9, [])[0]["state"], first[0]["state"])
    finally:
        env_a.close()
        env_b.close()


def _assert_sensible_image(image: np.ndarray, size: int, what: str) -> None:
    assert image.shape == (size, size, 3) and image.dtype == np.uint8, what
    # Black (or white) frames from a broken GL context are constant; a scene has texture and mid tones.
    assert image.std() > 10.0, f"{what}: near-constant image (std {image.std():.1f})"
    assert 20.0 < image.mean() < 235.0, f"{what}: implausible mean brightness {image.mean():.1f}"


@pytest.mark.parametrize("task", TASKS)
def test_env_checker_and_rendered_images(task: str) -> None:
    # One env with image observations and rgb_array rendering: building renderers dominates the cost.
    # Tasks run one after another in this process, so every env here is a "second env" for the
    # black-frame regression (fast render settings reused in one process).
    size = 48
    env = make_env(task, image=True, image_size=size, render_mode="rgb_array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a checker warning is a contract breach, except:
            # unbounded state entries (velocities, relative positions) are legitimate.
            warnings.filterwarnings("ignore", message=r".*Box observation space (min|max)imum value is")
            # Meta-World's own spaces pin unused slots (assembly's second object) to one value.
            warnings.filterwarnings("ignore", message=r".*maximum and minimum values are equal")
            check_env(env.unwrapped)
        observations = _rollout(env, 3, _random_actions(env, 5, seed=2))
        for t, obs in enumerate(observations):
            assert env.observation_space.contains(obs), {k: (v.shape, v.dtype) for k, v in obs.items()}
            _assert_sensible_image(obs["image"], size, f"image observation at step {t}")
        view = env.render()
        assert isinstance(view, np.ndarray)
        _assert_sensible_image(view, view.shape[0], "render()")
    finally:
        env.close()


@pytest.mark.parametrize("task", TASKS)
def test_expert_runs_episodes_and_succeeds(task: str) -> None:
    spec = get_task(task)
    env = make_env(task)
    successes = 0
    try:
        for seed in range(3):
            expert = make_expert(task, seed)
            obs, info = env.reset(seed=seed)
            for _ in range(spec.max_episode_steps):
                action = np.asarray(expert(obs, info))
                assert action.shape == (spec.action_dim,) and np.isfinite(action).all()
                assert np.all(np.abs(action) <= 1.0), f"expert action {action} outside [-1, 1]"
                obs, _, terminated, truncated, info = env.step(action)
                assert terminated == info["success"], "episodes terminate exactly on success"
                if terminated or truncated:
                    break
            assert terminated or truncated, "the TimeLimit must end every episode"
            successes += int(info["success"])
            if successes:
                break
    finally:
        env.close()
    # Every registered expert succeeds >= 90% of the time: three straight failures mean it is broken.
    assert successes >= 1
