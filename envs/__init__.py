"""MuJoCo tasks with scripted experts, registered with gymnasium."""

import os

# MuJoCo picks its OpenGL backend when it is first imported, and every task module imports it: set the
# headless default here, before any of them. EGL renders offscreen on CPU (Mesa) with no display.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
