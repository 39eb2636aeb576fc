#!/usr/bin/env bash
# README command 1: set up .venv, then run the main job on the embedded default task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-$MUJOCO_GL}"
exec .venv/bin/python -m scd_policy.cli.demo "$@"
