"""Environments "from outside" for the external-task tests: plain gymnasium envs the library did not
write, imported by path (``external_env_helpers:make_dict_env``) as a user's module would be."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class DictPointEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """A point on a plane driven to a goal: Dict observations (a (3,) ``observation``, a (4, 2)
    ``keypoints`` array, an (8, 8, 3) uint8 ``pixels`` image), a [-0.5, 0.5]^2 velocity action, and
    ``info["is_success"]`` (gymnasium-robotics' name) within 0.05 of the goal."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 20}  # noqa: RUF012

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Dict(
            {
                "observation": gym.spaces.Box(-2.0, 2.0, (3,), np.float64),
                "keypoints": gym.spaces.Box(-2.0, 2.0, (4, 2), np.float64),
                "pixels": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8),
            }
        )
        self.action_space = gym.spaces.Box(-0.5, 0.5, (2,), np.float32)
        self.position = np.zeros(2)
        self.goal = np.zeros(2)
        self.last_action = np.zeros(2)

    def _obs(self) -> dict[str, np.ndarray]:
        offset = self.goal - self.position
        pixels = np.zeros((8, 8, 3), np.uint8)
        pixels[..., 0] = np.uint8(127 + 100 * np.tanh(offset[0]))
        return {
            "observation": np.array([*self.position, np.linalg.norm(offset)]),
            "keypoints": np.stack([self.position, self.goal, offset, self.last_action]),
            "pixels": pixels,
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-1.0, 1.0, 2)
        self.goal = self.np_random.uniform(-1.0, 1.0, 2)
        self.last_action = np.zeros(2)
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        self.last_action = np.asarray(action, dtype=np.float64)
        self.position = np.clip(self.position + 0.2 * self.last_action, -2.0, 2.0)
        distance = float(np.linalg.norm(self.goal - self.position))
        return self._obs(), -distance, False, False, {"is_success": distance < 0.05}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        frame = np.full((32, 48, 3), 40, np.uint8)  # not square: the adapter resizes
        x, y = ((self.position + 2.0) / 4.0 * [47, 31]).astype(int)
        frame[y, x] = 255
        return frame


def make_dict_env(render_mode: str | None = None) -> DictPointEnv:
    return DictPointEnv(render_mode=render_mode)


class PointExpert:
    """Heads for the goal at full speed (reads the adapted, flattened ``keypoints``: offset at 4:6)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        offset = obs["keypoints"][4:6]
        # [-1, 1] maps onto the env's [-0.5, 0.5]: a unit action moves 0.1 per step.
        return np.clip(offset / 0.1, -1.0, 1.0).astype(np.float32)


def make_point_expert(seed: int) -> PointExpert:
    return PointExpert(seed)


def make_not_an_env() -> object:
    return object()


def make_discrete_env() -> gym.Env[Any, Any]:
    return gym.make("CartPole-v1")  # Discrete actions: refused


class UnboundedActionEnv(DictPointEnv):
    def __init__(self, render_mode: str | None = None) -> None:
        super().__init__(render_mode)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


class NoRenderEnv(DictPointEnv):
    metadata: dict[str, Any] = {"render_modes": [], "render_fps": 20}  # noqa: RUF012


def make_unbounded_env() -> UnboundedActionEnv:
    return UnboundedActionEnv()


def make_no_render_env() -> NoRenderEnv:
    return NoRenderEnv()


def far_right(obs: dict[str, np.ndarray], info: dict[str, Any]) -> bool:
    """A user's success function: the point is right of x = 1 (reads the renamed ``state``)."""
    return bool(obs["state"][0] > 1.0)


def spec_in_child(task: str) -> tuple[int, str]:
    """Run in a spawned process: what that fresh interpreter finds under ``task``."""
    from envs.registry import get_task

    spec = get_task(task)
    return spec.action_dim, spec.expert_entry_point
