#!/usr/bin/env bash
# One-time (and idempotent) set-up of this checkout: system libraries for headless MuJoCo
# rendering, then a virtual environment at .venv with the package installed in editable mode.
# Re-running it is cheap: the pip step is skipped while pyproject.toml and constraints.txt
# are unchanged since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

# Headless rendering needs an EGL (or OSMesa) implementation. Most images of this machine
# kind ship Mesa's EGL; install it (and OSMesa as a fallback) when it is missing.
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing EGL/OSMesa libraries for headless rendering (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1 libgles2 libosmesa6 >/dev/null
    else
        log "WARNING: libEGL.so.1 not found and apt-get unavailable; image observations will not render"
    fi
fi

PYTHON_BIN="${PYTHON:-}"
if [ -z "$PYTHON_BIN" ]; then
    for candidate in python3.11 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PYTHON_BIN="$candidate"; break; fi
    done
fi
"$PYTHON_BIN" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version}"'

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $("$PYTHON_BIN" --version)"
    "$PYTHON_BIN" -m venv .venv
fi

stamp=.venv/.scd-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing scd-policy and its dependencies into .venv (about a minute)"
    .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    # torch first and alone: it must come from the CPU build pinned in constraints.txt.
    .venv/bin/python -m pip install --quiet -c constraints.txt torch 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,onnx]" 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import torch, mujoco, zarr, onnxruntime, scd_policy, envs' \
        || { log "ERROR: the install did not complete (see pip's output above)"; exit 1; }
    echo "$want" > "$stamp"
else
    log ".venv is up to date"
fi
