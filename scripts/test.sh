#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then run the whole check suite: lint, format, types, tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-$MUJOCO_GL}"

echo "[test] ruff check"; .venv/bin/ruff check .
echo "[test] ruff format --check"; .venv/bin/ruff format --check .
echo "[test] mypy"; .venv/bin/mypy
echo "[test] pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test] ERROR: pytest collected no tests — that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
