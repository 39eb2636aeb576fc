"""An external task for scd-policy: gymnasium's InvertedPendulum-v5 with a success criterion and a
scripted expert of our own, the way a user brings an env the library did not write (docs/tasks.md).

It can be used in the three ways the CLIs accept (run them from this folder, or put it on PYTHONPATH):

    task=pendulum_task:make_env expert=pendulum_task:make_expert   # a factory (success in info)
    task=pendulum_balance task_module=pendulum_task                # the name this module registers
    task=gym:InvertedPendulum-v5 expert=pendulum_task:make_expert  # gymnasium's env as it is (no success)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from envs.external import external_task_spec
from envs.registry import register_task

BALANCE_STEPS = 100  # success: the pole is still up after this many control steps (4 s at 25 Hz)
RESET_NOISE = 0.1  # InvertedPendulum's start-state noise (its default, 0.01, starts almost upright)
# State feedback on (cart position, pole angle, cart velocity, pole angular velocity), in the env's
# force units; found by a small grid search, it balances 50 of 50 seeded starts, with noise on its
# actions too.
GAINS = np.array([1.0, 10.0, 1.0, 1.0])
MAX_FORCE = 3.0  # the env's action bound: the library's actions in [-1, 1] map onto [-3, 3]


class BalanceFor(gym.Wrapper[Any, Any, Any, Any]):
    """Reports ``info["success"]`` once the pole has stayed up for ``steps`` control steps."""

    def __init__(self, env: gym.Env[Any, Any], steps: int = BALANCE_STEPS) -> None:
        super().__init__(env)
        self.steps = steps
        self._t = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._t = 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        info["success"] = self._t >= self.steps and not terminated
        return obs, reward, terminated, truncated, info


def make_env(render_mode: str | None = None) -> gym.Env[Any, Any]:
    """The task's env: InvertedPendulum-v5 (4-D Box observation, 1-D force action) with success."""
    return BalanceFor(gym.make("InvertedPendulum-v5", render_mode=render_mode, reset_noise_scale=RESET_NOISE))


class PendulumExpert:
    """Linear state feedback; reads the adapted observation (``obs["state"]``) and answers in [-1, 1]."""

    def __init__(self, seed: int) -> None:
        self.seed = seed  # deterministic: kept for the expert factory's contract

    def __call__(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        force = float(GAINS @ obs["state"].astype(np.float64))
        return np.array([np.clip(force / MAX_FORCE, -1.0, 1.0)], dtype=np.float32)


def make_expert(seed: int) -> PendulumExpert:
    return PendulumExpert(seed)


register_task(
    external_task_spec(
        "pendulum_task:make_env",
        name="pendulum_balance",
        expert="pendulum_task:make_expert",
        success=f"the pole is still up after {BALANCE_STEPS} steps",
    )
)
