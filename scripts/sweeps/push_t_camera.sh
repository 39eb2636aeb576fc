#!/usr/bin/env bash
# Issue H.5: push_t from the camera only (one 96x96 top view, no state vector), scd against
# diffusion_policy on the same 500 demonstrations and budget, 50 episodes x evaluation seeds [0, 1, 2]
# per training seed. One scd-quality with jobs=2: both policies at once, one core each, each logging to
# <out>/logs/. Every run checkpoints: re-run the same command to continue an interrupted sweep
# (a later session picks up where the last one stopped).
#
# The budget is the issue's 2 core-hours per run: on this CPU a `small` image policy at batch 64
# costs ~0.6 s (scd) and ~0.95 s (diffusion_policy) per optimizer step (`scd-bench suite=train
# size=small images=true train_batch=64`), so diffusion_policy fits ~7,500 steps, the default here.
# With a GPU, pass the state cell's 20000 steps.
#
# usage: scripts/sweeps/push_t_camera.sh <out> [train_seed=0] [steps=7500] [policies=scd,diffusion_policy]
set -euo pipefail
out=$(realpath -m "${1:?usage: push_t_camera.sh <out> [train_seed] [steps] [policies]}")
seed=${2:-0}
steps=${3:-7500}
policies=${4:-scd,diffusion_policy}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export OMP_NUM_THREADS=1 MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p "$out"
nice -n 10 "$repo/.venv/bin/scd-quality" out="$out" tasks=[] image_tasks=[push_t] demos=500 size=small \
  "steps=$steps" batch_size=64 threads=1 "train_seeds=[$seed]" episodes=50 "seeds=[0,1,2]" n_envs=1 \
  workers=2 jobs=2 "policies=[$policies]"
cat "$out/quality.md"
