"""Base class for our own MuJoCo tasks, in dm_control's task shape.

A task supplies physics accessors and four hooks — ``initialize_episode``, ``apply_action``,
``get_state``, ``get_reward`` / ``is_success`` — and this class turns them into a gymnasium env
with dict observations (``state`` always, ``image`` and further camera keys when asked), a seeded RNG,
``info["success"]`` and fast headless rendering.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np

from envs.rendering import CameraSet, FastRenderer, image_cameras

ASSETS = Path(__file__).resolve().parent / "assets"


class MujocoTaskEnv(gym.Env[dict[str, np.ndarray], np.ndarray], ABC):
    """A gymnasium env around one MJCF model; subclasses implement the task hooks.

    ``fps`` (control steps per second) is the task's one statement of its control rate: the physics
    steps per control step follow from it and the MJCF timestep, and its TaskSpec reads it.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 10}  # noqa: RUF012

    xml_file: ClassVar[str] = ""  # file name under envs/assets/
    state_dim: ClassVar[int] = 0
    action_dim: ClassVar[int] = 0
    fps: ClassVar[float] = 10.0  # control steps per second
    default_camera: ClassVar[str] = "top"

    def __init__(
        self,
        image: bool = False,
        camera: str | None = None,
        image_size: int = 96,
        render_mode: str | None = None,
        render_size: int = 256,
        cameras: Mapping[str, str] | None = None,
    ) -> None:
        """``image=True`` observes ``image`` from ``camera``; ``cameras`` maps further observation keys
        to cameras (``{"image_side": "side"}``), all rendered at ``image_size``."""
        self.model = mujoco.MjModel.from_xml_path(str(ASSETS / self.xml_file))
        self.data = mujoco.MjData(self.model)
        skip = 1.0 / (self.fps * float(self.model.opt.timestep))
        if abs(skip - round(skip)) > 1e-6 or round(skip) < 1:
            raise ValueError(
                f"{type(self).__name__}: fps={self.fps} is not a whole number of {self.xml_file}'s "
                f"{self.model.opt.timestep} s physics steps"
            )
        self.frame_skip = round(skip)  # physics steps per control step
        self.metadata = {**self.metadata, "render_fps": self.fps}
        self.camera = camera or self.default_camera
        self.image_size = image_size
        self.render_mode = render_mode
        self.render_size = render_size
        named = [self.model.camera(i).name for i in range(self.model.ncam)]
        self._cameras = CameraSet(self.model, image_cameras(image, self.camera, cameras, named), image_size)
        spaces: dict[str, gym.Space[Any]] = {
            "state": gym.spaces.Box(-np.inf, np.inf, (self.state_dim,), np.float32)
        }
        for key in self._cameras.cameras:
            spaces[key] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space: gym.spaces.Dict = gym.spaces.Dict(spaces)  # type: ignore[assignment]
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)
        self._view_renderer: FastRenderer | None = None
        self._rng = np.random.default_rng()
        self._steps = 0

    # ---- task hooks -------------------------------------------------------------------------
    @abstractmethod
    def initialize_episode(self, rng: np.random.Generator) -> None:
        """Set the initial physics state (qpos/qvel/mocap/geom colours) and any task variables."""

    @abstractmethod
    def apply_action(self, action: np.ndarray) -> None:
        """Write one control step's action (in [-1, 1]) into ``self.data.ctrl`` / mocap targets."""

    @abstractmethod
    def get_state(self) -> np.ndarray:
        """The ``state`` observation (float32, shape (state_dim,))."""

    @abstractmethod
    def get_reward(self) -> float:
        """This control step's reward."""

    @abstractmethod
    def is_success(self) -> bool:
        """Whether the task is solved now (success also ends the episode)."""

    def after_step(self) -> None:
        """Update task variables once the physics has advanced (before observation, reward and info)."""

    def is_failure(self) -> bool:
        """True when the episode has failed irrecoverably (it then terminates without success)."""
        return False

    def task_info(self) -> dict[str, Any]:
        """Extra per-step info for experts and analysis (e.g. the chosen mode, the cue)."""
        return {}

    # ---- gymnasium API ----------------------------------------------------------------------
    @property
    def control_dt(self) -> float:
        return float(self.model.opt.timestep * self.frame_skip)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._rng = self.np_random
        mujoco.mj_resetData(self.model, self.data)
        self.initialize_episode(self._rng)
        mujoco.mj_forward(self.model, self.data)
        self._steps = 0
        return self._observation(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        if action.shape != (self.action_dim,):
            raise ValueError(f"action has shape {action.shape}; expected ({self.action_dim},)")
        self.apply_action(action)
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        self._steps += 1
        self.after_step()
        info = self._info()
        terminated = bool(info["success"]) or self.is_failure()
        return self._observation(), float(self.get_reward()), terminated, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._view_renderer is None:
            self._view_renderer = FastRenderer(self.model, self.render_size, self.camera)
        return self._view_renderer.render(self.data)

    def close(self) -> None:
        self._cameras.close()
        if self._view_renderer is not None:
            self._view_renderer.close()
        self._view_renderer = None

    # ---- helpers ----------------------------------------------------------------------------
    def _observation(self) -> dict[str, np.ndarray]:
        return {"state": self.get_state().astype(np.float32), **self._cameras.render(self.data)}

    def _info(self) -> dict[str, Any]:
        return {"success": bool(self.is_success()), "steps": self._steps, **self.task_info()}
