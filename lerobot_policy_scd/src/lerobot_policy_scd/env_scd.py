"""scd-policy's own tasks as a LeRobot environment: ``lerobot-eval --env.type=scd --env.task=reach_around``.

LeRobot's rollout loop reads gym observations named ``agent_pos`` (state) and ``pixels`` (HWC uint8:
an array becomes ``observation.image``, a dict ``{camera: array}`` ``observation.images.<camera>``) and
the success flag ``info["is_success"]``; our tasks say ``state`` / ``image`` / ``info["success"]``.
``LeRobotKeys`` renames them (the camera as ``observation.images.<camera>`` by default, the name
``scd-convert to-lerobot`` gives it), and ``SCDEnvConfig`` registers the wrapped task with gymnasium as
``scd_lerobot/<task>``, so LeRobot's ``make_env`` builds it like any other environment.
"""

# No `from __future__ import annotations`: draccus reads these annotations at run time.
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from envs.registry import get_task, make_env

GYM_NAMESPACE = "scd_lerobot"


class LeRobotKeys(gym.Wrapper[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]):
    """Observation keys and the success flag as LeRobot's rollout loop expects them."""

    def __init__(
        self, env: gym.Env[dict[str, np.ndarray], np.ndarray], task_description: str, camera: str | None
    ) -> None:
        super().__init__(env)
        self.camera = camera  # None: a plain ``pixels`` array (observation.image)
        spaces: dict[str, gym.Space[Any]] = {"agent_pos": env.observation_space["state"]}  # type: ignore[index]
        if "image" in env.observation_space.spaces:  # type: ignore[attr-defined]
            image_space = env.observation_space["image"]  # type: ignore[index]
            spaces["pixels"] = image_space if camera is None else gym.spaces.Dict({camera: image_space})
        self.observation_space = gym.spaces.Dict(spaces)  # type: ignore[assignment]
        self.task_description = task_description
        self.task = task_description

    def _rename(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        renamed: dict[str, Any] = {"agent_pos": obs["state"]}
        if "image" in obs:
            renamed["pixels"] = obs["image"] if self.camera is None else {self.camera: obs["image"]}
        return renamed

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return self._rename(obs), {**info, "is_success": bool(info.get("success", False))}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "is_success": bool(info.get("success", False))}
        return self._rename(obs), float(reward), terminated, truncated, info


def make_lerobot_env(
    task: str,
    image: bool = True,
    image_size: int = 96,
    camera: str | None = None,
    camera_feature: str | None = None,
    render_mode: str | None = "rgb_array",
    max_episode_steps: int | None = None,
) -> gym.Env[dict[str, np.ndarray], np.ndarray]:
    """One of our tasks (envs.registry), wrapped for LeRobot; the gym entry point of ``scd_lerobot/*``.

    ``camera_feature`` is the LeRobot name of the camera: ``observation.images.<name>`` (default:
    the env camera's name) or ``observation.image``.
    """
    spec = get_task(task)
    feature = camera_feature or f"{OBS_IMAGES}.{camera or spec.cameras[0]}"
    env = make_env(
        task,
        image=image,
        camera=camera,
        image_size=image_size,
        render_mode=render_mode,
        max_episode_steps=max_episode_steps,
    )
    name = None if feature == OBS_IMAGE else feature.removeprefix(f"{OBS_IMAGES}.")
    return LeRobotKeys(env, task_description=spec.success, camera=name)


@EnvConfig.register_subclass("scd")
@dataclass
class SCDEnvConfig(EnvConfig):  # type: ignore[misc]  # lerobot ships no type information
    task: str | None = "reach_around"
    fps: int = 10
    episode_length: int | None = None  # None: the task's own limit
    image: bool = True
    image_size: int = 96
    camera: str | None = None  # None: the task's default camera
    camera_feature: str | None = None  # None: observation.images.<camera>; or observation.image
    features: dict[str, PolicyFeature] = field(default_factory=dict)
    features_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task is None:
            raise ValueError("env.task must name a registered scd-policy task, e.g. reach_around")
        spec = get_task(self.task)  # raises KeyError listing the registered tasks
        self.fps = round(spec.fps)
        self.features = {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(spec.action_dim,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(spec.state_dim,)),
        }
        self.features_map = {ACTION: ACTION, "agent_pos": OBS_STATE}
        if self.image:
            size = self.image_size
            self.features["pixels"] = PolicyFeature(type=FeatureType.VISUAL, shape=(size, size, 3))
            camera = self.camera or spec.cameras[0]
            feature = self.camera_feature or f"{OBS_IMAGES}.{camera}"
            if feature != OBS_IMAGE and not feature.startswith(f"{OBS_IMAGES}."):
                raise ValueError(
                    f"env.camera_feature={feature!r}; expected {OBS_IMAGE} or {OBS_IMAGES}.<name>"
                )
            self.features_map["pixels"] = feature
        if self.gym_id not in gym.registry:
            gym.register(
                id=self.gym_id,
                entry_point=f"{__name__}:make_lerobot_env",
                kwargs={"task": self.task},
                max_episode_steps=spec.max_episode_steps,
            )

    @property
    def package_name(self) -> str:
        return GYM_NAMESPACE

    @property
    def gym_id(self) -> str:
        return f"{GYM_NAMESPACE}/{self.task}"

    @property
    def gym_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "image": self.image,
            "image_size": self.image_size,
            "camera": self.camera,
            "camera_feature": self.camera_feature,
        }
        if self.episode_length is not None:
            kwargs["max_episode_steps"] = self.episode_length
        return kwargs
