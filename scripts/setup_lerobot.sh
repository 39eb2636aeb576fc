#!/usr/bin/env bash
# One-time (and idempotent) set-up of .venv-lerobot: LeRobot 0.4.4 next to the CPU build of torch 2.13,
# with scd-policy and its LeRobot plugin (lerobot_policy_scd) installed in editable mode. It is kept
# apart from .venv so the main install stays free of LeRobot (see docs/lerobot.md).
#
# - requirements/lerobot-lock.txt pins every package; it is installed with `pip --no-deps`, because
#   lerobot 0.4.4 declares torch<2.11 / torchvision<0.26 / torchcodec<0.11 and pip cannot override
#   those (the lock is compiled with uv's --override: requirements/lock_lerobot.sh).
# - PyPI's torchvision is a CUDA build; requirements/patch_torchvision.py makes it importable next to
#   CPU torch (LeRobot uses only its pure-Python transforms).
# - torchcodec decodes LeRobot's videos through the system FFmpeg libraries (Debian: the ffmpeg package).
# Re-running it is cheap: the pip steps are skipped while the inputs below are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup-lerobot] %s\n' "$*"; }

# System libraries: FFmpeg for torchcodec's video decoding, EGL for MuJoCo's headless rendering.
missing_apt=()
ldconfig -p 2>/dev/null | grep -q 'libavcodec.so' || missing_apt+=(ffmpeg)
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || missing_apt+=(libegl1 libgl1 libgles2 libosmesa6)
if [ "${#missing_apt[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing ${missing_apt[*]} (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
    else
        log "WARNING: system packages ${missing_apt[*]} are missing and apt-get is unavailable;" \
            "video decoding or rendering will fail"
    fi
fi

# The lock is compiled for CPython 3.11 (lerobot 0.4.4 is the newest release that supports it).
PYTHON_BIN="${PYTHON311:-python3.11}"
if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
    log "ERROR: $PYTHON_BIN not found; .venv-lerobot needs CPython 3.11 (set PYTHON311=/path/to/python3.11)"
    exit 1
fi
"$PYTHON_BIN" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'

venv=.venv-lerobot
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv with $("$PYTHON_BIN" --version)"
    "$PYTHON_BIN" -m venv "$venv"
fi

inputs=(requirements/lerobot-lock.txt requirements/patch_torchvision.py pyproject.toml constraints.txt
        lerobot_policy_scd/pyproject.toml scripts/setup_lerobot.sh)
stamp="$venv/.scd-installed"
want="$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "$venv is up to date"
    exit 0
fi

pip_quiet() {  # pip without its notes about missing local mirrors; pip's own exit status counts
    local status=0
    "$venv/bin/python" -m pip --quiet "$@" > "$venv/.pip.log" 2>&1 || status=$?
    grep -v '^WARNING: Location' "$venv/.pip.log" || true
    if [ "$status" -ne 0 ]; then log "ERROR: pip $* failed (exit $status)"; exit "$status"; fi
}
start=$SECONDS
log "installing the locked LeRobot working set into $venv (a few minutes, ~2.8 GB)"
pip_quiet install --upgrade pip
pip_quiet install --no-deps -r requirements/lerobot-lock.txt
# hatchling comes from the lock, so the editable builds need no isolated build environment.
pip_quiet install --no-deps --no-build-isolation -e . -e ./lerobot_policy_scd
# scd-policy's onnx extra (backend=onnx, and the LeRobot latency comparison runs SCD on it too), at the
# main set-up's pins; it only adds its own packages to the locked set.
pip_quiet install -c constraints.txt onnx onnxscript onnx-ir onnxruntime
"$venv/bin/python" requirements/patch_torchvision.py

# Every requirement must hold except the three pins of lerobot the lock overrides on purpose.
problems="$("$venv/bin/python" -m pip check 2>/dev/null \
    | grep -Ev '^lerobot [0-9.]+ has requirement (torch|torchvision|torchcodec)[<>=]' \
    | grep -v '^No broken requirements' || true)"
if [ -n "$problems" ]; then
    log "ERROR: $venv has unmet requirements (refresh the lock: bash requirements/lock_lerobot.sh):"
    printf '%s\n' "$problems" >&2
    exit 1
fi
HF_HUB_OFFLINE=1 "$venv/bin/python" -c '
import torch, torchvision.transforms.v2, torchcodec.decoders
import lerobot.datasets.lerobot_dataset, lerobot_policy_scd, scd_policy, envs, onnxruntime
' || { log "ERROR: the install did not complete (see the output above)"; exit 1; }
echo "$want" > "$stamp"
log "done in $((SECONDS - start)) s"
