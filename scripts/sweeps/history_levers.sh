#!/usr/bin/env bash
# Issue H.3: SCD's history window (2 / 8 / 32 steps) x each training lever against copycat, on a fully
# observed task (mw_push, where long windows cost success) and the memory task (memory_cue, which needs
# 32 steps). Every cell is one resumable `scd-quality` run in its own folder, all on the same
# demonstrations (collected once into <root>/data), scored on the usual protocol (50 episodes x
# evaluation seeds [0, 1, 2]). Two workers take cells from one queue; re-run the same command to
# continue an interrupted sweep (evaluated cells are read back, trainings resume). Then:
#   .venv/bin/python scripts/analysis/lever_table.py <root> --out docs/results/h/levers
#
# The same levers run on the other cells of issue H's table by naming them (tasks and windows, comma-
# separated): e.g. the 10-demonstration Meta-World set at W = 32 with past-token prediction,
#   scripts/sweeps/history_levers.sh <root> 0 2 past_token_prediction mw_shelf_place,mw_hammer 32
# Each task keeps its table budget (TASK below); its demonstrations are collected once into <root>/data.
#
# usage: scripts/sweeps/history_levers.sh <root> [train_seed=0] [workers=2] [levers=all]
#          [tasks=memory_cue,mw_push] [windows=32,8,2]
set -euo pipefail
root=$(realpath -m "${1:?usage: history_levers.sh <root> [train_seed] [workers] [levers] [tasks] [windows]}")
seed=${2:-0}
workers=${3:-2}
ALL_LEVERS="defaults no_dropout history_noise context_noise past_actions random_history no_prev_action
  past_token_prediction combined ptp_batch_quarter ptp_batch_eighth"
levers=${4:-$ALL_LEVERS}
levers=${levers//,/ }
tasks=${5:-memory_cue,mw_push}
tasks=${tasks//,/ }
windows=${6:-32,8,2}
windows=${windows//,/ }
repo=$(cd "$(dirname "$0")/../.." && pwd)
py="$repo/.venv/bin/python"
export OMP_NUM_THREADS=1 MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p "$root/data"

# The levers, each on top of the library's defaults (prev_action_dropout 0.5, context_noise 0.05).
declare -A LEVER=(
  [defaults]=""
  [no_dropout]="policy.prev_action_dropout=0.0"
  [history_noise]="policy.history_noise=0.3"
  [context_noise]="policy.context_noise=0.3"
  [past_actions]="policy.past_actions=4"
  [random_history]="policy.random_history=0.5"
  # No previous-action token at all (the copying shortcut removed rather than hidden half the time).
  [no_prev_action]="policy.prev_action_input=false"
  # Past-token prediction as Torne et al. run it: observations in, past and future actions out.
  [past_token_prediction]="policy.prev_action_input=false policy.past_actions=4"
  # Every lever that did not hurt on its own, together.
  [combined]="policy.prev_action_input=false policy.past_actions=4 policy.random_history=0.5 policy.context_noise=0.3"
  # Past-token prediction at about the 2-step window's cost per step: a 32-step window denoises 8
  # chunks (decoder_steps) where a 2-step one denoises 2, so a quarter (an eighth) of the windows per
  # batch gives as many (half as many) chunks per step; "batch_size=/4" divides the task's batch.
  [ptp_batch_quarter]="policy.prev_action_input=false policy.past_actions=4 batch_size=/4"
  [ptp_batch_eighth]="policy.prev_action_input=false policy.past_actions=4 batch_size=/8"
)
# Each task's cell of the table: demonstrations, preset and budget. The CPU table's for mw_push, the
# main job's for memory_cue, issue H.4's for the 10-demonstration Meta-World set (scripts/sweeps/
# metaworld10.sh), H.2's for reach_around.
declare -A TASK=(
  [mw_push]="demos=100 size=tiny steps=4500 batch_size=32"
  [memory_cue]="demos=100 size=tiny steps=1500 batch_size=32"
  [reach_around]="demos=100 size=small steps=10000 batch_size=64"
)
for task in mw_hammer mw_bin_picking mw_shelf_place mw_assembly mw_pick_out_of_hole mw_disassemble \
  mw_stick_pull; do
  TASK[$task]="demos=10 size=tiny steps=4500 batch_size=32"
done
for task in $tasks; do
  [[ -n ${TASK[$task]:-} ]] || { echo "history_levers.sh: no table cell for task '$task' (known: ${!TASK[*]})" >&2; exit 2; }
done

# One line per cell, the long windows first: they decide the default.
queue="$root/queue.$$.txt"  # this invocation's own: two may share a root with different levers
: >"$queue"
for window in $windows; do
  for task in $tasks; do
    for lever in $levers; do
      echo "$task $window $lever" >>"$queue"
    done
  done
done

for task in $tasks; do  # the demonstrations, once, before any worker reads them
  demos=$(tr ' ' '\n' <<<"${TASK[$task]}" | sed -n 's/^demos=//p')
  "$py" -c "from scd_policy.collection import CollectConfig, collect_up_to
collect_up_to(CollectConfig(task='$task', out='$root/data/$task.zarr', image=False, workers=2), $demos)"
done

run_cell() {  # <task> <window> <lever>
  local task=$1 window=$2 lever=$3 out="$root/$1_w$2_$3"
  local extra=("policy.train_window=$window") budget item field value
  read -ra budget <<<"${TASK[$task]}"
  # With 32-step windows a training step denoises a random 8 of the window's chunks (the main job's
  # recipe); shorter windows denoise every step's chunk.
  ((window > 8)) && extra+=("policy.decoder_steps=8")
  # A lever is one or more space-separated items: policy.* / train.* overrides, or a field of the
  # task's budget (field=value, or field=/n: the budget's value divided by n).
  for item in ${LEVER[$lever]}; do
    case $item in
      policy.* | train.*) extra+=("$item") ;;
      *)
        field=${item%%=*} value=${item#*=}
        for i in "${!budget[@]}"; do
          if [[ ${budget[$i]%%=*} == "$field" ]]; then
            [[ $value == /* ]] && value=$((${budget[$i]#*=} ${value:0:1} ${value:1}))
            budget[i]="$field=$value"
          fi
        done
        ;;
    esac
  done
  mkdir -p "$out"
  ln -sfn "$root/data" "$out/data"
  local list
  list=$(printf '"%s",' "${extra[@]}")
  nice -n 10 "$repo/.venv/bin/scd-quality" out="$out" tasks="[$task]" image_tasks=[] policies=[scd] \
    "${budget[@]}" threads=1 train_seeds="[$seed]" episodes=50 \
    seeds=[0,1,2] n_envs=1 workers=1 overrides="[\"train.warmup_steps=100\",${list%,}]" \
    >"$out/log.txt" 2>&1 || echo "FAILED: $task w$window $lever (see $out/log.txt)"
}

worker() {
  local line
  while true; do
    line=$(flock "$queue.lock" bash -c 'head -n1 "$0" && sed -i 1d "$0"' "$queue")
    [[ -z $line ]] && return
    echo "$(date +%T) worker $1: $line"
    run_cell $line
  done
}

for ((w = 0; w < workers; w++)); do worker "$w" & done
wait
echo "$(date +%T) sweep finished: $root"
