"""Headless offscreen rendering with the fast settings measured on this machine kind.

MuJoCo's default quality renders a 4096^2 shadow map, which caps CPU rendering near 10 fps whatever
the image size. Switching off shadows, reflections and multisampling gives ~90 fps at 96-128 px.
"""

from __future__ import annotations

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
