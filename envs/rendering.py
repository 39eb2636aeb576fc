"""Headless offscreen rendering with the fast settings measured on this machine kind.

MuJoCo's default quality renders a 4096^2 shadow map, which caps CPU rendering near 10 fps whatever
the image size. Switching off shadows, reflections and multisampling gives ~90 fps at 96-128 px.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mujoco  # with the headless GL backend chosen in envs/__init__.py
import numpy as np


class FastRenderer:
    """An offscreen RGB renderer for one model and one camera at a fixed square size."""

    def __init__(self, model: mujoco.MjModel, size: int, camera: str | int = -1, flip: bool = False) -> None:
        model.vis.quality.offsamples = 0
        # The offscreen buffer must be at least as large as the image.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        self._renderer = mujoco.Renderer(model, size, size)
        self._scene_option = mujoco.MjvOption()
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.camera = camera
        self.flip = flip  # Meta-World's cameras produce upside-down images
        self.size = size

    def render(self, data: mujoco.MjData) -> np.ndarray:
        """Returns a (size, size, 3) uint8 image."""
        self._renderer.update_scene(data, camera=self.camera, scene_option=self._scene_option)
        # update_scene resets the flags from the model's defaults; set them again.
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1]) if self.flip else image

    def close(self) -> None:
        self._renderer.close()


def image_cameras(
    image: bool, camera: str, cameras: Mapping[str, str] | None, available: Sequence[str]
) -> dict[str, str]:
    """The image observations an env is asked for, observation key -> camera: ``image`` from ``camera``
    when ``image`` is set, plus every entry of ``cameras`` (several cameras, e.g. ``image_top`` and
    ``image_side``). Every camera must be one of ``available``."""
    wanted = {"image": camera} if image else {}
    for key, name in (cameras or {}).items():
        if key in wanted and wanted[key] != name:
            raise ValueError(f"image key {key!r} is asked from two cameras, {wanted[key]!r} and {name!r}")
        wanted[key] = name
    for name in wanted.values():
        if name not in available:
            raise ValueError(f"the env has no camera {name!r}; available: {list(available)}")
    return wanted


class CameraSet:
    """One offscreen renderer per image observation key, created on first use."""

    def __init__(
        self, model: mujoco.MjModel, cameras: Mapping[str, str], size: int, flip: bool = False
    ) -> None:
        self.model = model
        self.cameras = dict(cameras)  # observation key -> camera name
        self.size = size
        self.flip = flip
        self._renderers: dict[str, FastRenderer] = {}

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        """Every key's (size, size, 3) uint8 frame of ``data``."""
        frames = {}
        for key, camera in self.cameras.items():
            if key not in self._renderers:
                self._renderers[key] = FastRenderer(self.model, self.size, camera, flip=self.flip)
            frames[key] = self._renderers[key].render(data)
        return frames

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
