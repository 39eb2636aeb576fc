#!/usr/bin/env bash
# Issue H.4: the Meta-World set that does not saturate. 10 demonstrations per task (as DP3 and MP1
# report), two tasks or more from each of Meta-World's medium, hard and very hard categories, scd and
# diffusion_policy on the same data and budget (`tiny`, 4,500 steps of batch 32), 50 episodes x
# evaluation seeds [0, 1, 2]. One scd-quality with jobs=2: two (task, policy) runs at a time, one per
# core, each logging to <out>/logs/ (quality.md has the per-category means next to the DP3 paper's
# Diffusion Policy anchor). Re-run the same command to continue an interrupted sweep.
#
# The policies default to scd and diffusion_policy; name others (comma-separated) to train them on the
# same data in the same folder, e.g. `metaworld10.sh <out> 0 causal_diffusion` (its report then covers
# the policies named; name them all, e.g. scd,diffusion_policy,causal_diffusion, for one report of all).
#
# usage: scripts/sweeps/metaworld10.sh <out> [train_seed=0] [policies=scd,diffusion_policy]
set -euo pipefail
out=$(realpath -m "${1:?usage: metaworld10.sh <out> [train_seed] [policies]}")
seed=${2:-0}
policies=${3:-scd,diffusion_policy}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export OMP_NUM_THREADS=1 MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p "$out"
tasks=mw_hammer,mw_bin_picking,mw_shelf_place,mw_assembly,mw_pick_out_of_hole,mw_disassemble,mw_stick_pull
nice -n 10 "$repo/.venv/bin/scd-quality" out="$out" "tasks=[$tasks]" image_tasks=[] "policies=[$policies]" \
  demos=10 size=tiny steps=4500 batch_size=32 threads=1 "train_seeds=[$seed]" episodes=50 "seeds=[0,1,2]" \
  n_envs=1 workers=1 jobs=2 'overrides=["train.warmup_steps=100"]'
cat "$out/quality.md"
