"""The README's main job: collect demonstrations -> train an SCD policy -> roll it out in MuJoCo.

    python -m scd_policy.cli.demo            # (what `bash scripts/demo.sh` runs)
    python -m scd_policy.cli.demo --help

Each stage is the library's own entry point (``collect``, ``run_training``, ``run_eval``) with a small
embedded configuration sized for a 2-core CPU; the printed summary says how to run each stage at a
larger scale with the command-line tools.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from scd_policy.cli.common import setup_logging, user_errors

log = logging.getLogger("scd_policy.demo")

DEFAULT_TASK = "memory_cue"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scd-demo",
        description=(
            "Collect scripted-expert demonstrations of a MuJoCo task, train a Separable Causal Diffusion "
            "policy on them, roll it out, and print the success rate and per-step latency."
        ),
    )
    parser.add_argument("--task", default=DEFAULT_TASK, help="registered task name (default: %(default)s)")
    parser.add_argument(
        "--episodes", type=int, default=100, help="demonstrations to collect (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default: %(default)s)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"], help="model size preset")
    parser.add_argument(
        "--eval-episodes", type=int, default=50, help="rollouts to evaluate (default: %(default)s)"
    )
    parser.add_argument(
        "--workdir", default=".", help="where datasets/ and runs/ go (default: the current folder)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    with user_errors("scd-demo"):
        return run_demo(args)


def run_demo(args: argparse.Namespace) -> int:
    # Imported after argument parsing so that --help is instant.
    from scd_policy.cli.collect import CollectConfig, collect_up_to
    from scd_policy.cli.eval import EvalRunConfig, run_eval
    from scd_policy.cli.train import compose_experiment, history_overrides, run_training

    workdir = Path(args.workdir)
    dataset = workdir / "datasets" / f"{args.task}.zarr"
    run_dir = workdir / "runs" / f"demo_{args.task}_scd"
    started = time.perf_counter()

    # 1. Demonstrations (kept between runs: a second run reuses them).
    log.info("[1/3] demonstrations")
    collect_up_to(CollectConfig(task=args.task, out=str(dataset), workers=2), args.episodes)
    collected = time.perf_counter()

    # 2. Training (fresh run folder each time, so the printed figures belong to this run).
    log.info("[2/3] training SCD (%s preset, %d steps) -> %s", args.size, args.steps, run_dir)
    cfg = compose_experiment(
        [
            f"dataset={dataset}",
            f"out={run_dir}",
            f"size={args.size}",
            # The history window the task declares (memory_cue: 32 steps, from cue to decision).
            *history_overrides(args.task),
            f"train.steps={args.steps}",
            "train.batch_size=32",
            "train.warmup_steps=100",
            "train.log_every=50",
            f"train.val_every={max(1, args.steps // 4)}",
            f"train.checkpoint_every={max(1, args.steps // 4)}",
            "train.num_threads=1",
        ]
    )
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    policy_dir = run_training(cfg)
    trained = time.perf_counter()

    # 3. Rollouts through the deployment runtime, 50 seeded episodes, videos of the first two.
    log.info("[3/3] evaluating over %d episodes in MuJoCo", args.eval_episodes)
    results = run_eval(
        EvalRunConfig(
            checkpoint=str(policy_dir),
            task=args.task,
            episodes=args.eval_episodes,
            seeds=[0],
            n_envs=1,
            videos=2,
            out=str(run_dir / "eval.json"),
        )
    )
    done = time.perf_counter()
    print(
        "\n"
        f"task {args.task}: SCD policy success rate {100 * float(results['success_rate']):.0f}% over "
        f"{args.eval_episodes} episodes\n"
        f"per-step latency (batch 1, K={results['num_inference_steps']}): "
        f"p50 {float(results['latency_ms_p50']):.2f} ms, p90 {float(results['latency_ms_p90']):.2f} ms\n"
        f"wall time: collect {collected - started:.0f} s, train {trained - collected:.0f} s, "
        f"eval {done - trained:.0f} s, total {done - started:.0f} s\n"
        f"results {run_dir / 'eval.json'}, videos {run_dir / 'eval_videos'}, "
        f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
