"""The README's main job: collect demonstrations -> train an SCD policy -> roll it out in MuJoCo.

    python -m scd_policy.cli.demo            # (what `bash scripts/demo.sh` runs)
    python -m scd_policy.cli.demo --help

The job itself is :func:`scd_policy.main_job.run_main_job`; this shell parses the options and prints
the summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scd_policy.cli.common import setup_logging, user_errors
from scd_policy.main_job import DEFAULT_TASK  # stdlib-only at import: --help stays instant


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
    from scd_policy.main_job import MainJob, run_main_job

    job = MainJob(args.task, args.episodes, args.steps, args.size, args.eval_episodes, Path(args.workdir))
    outcome = run_main_job(job)
    results, seconds, run_dir = outcome.results, outcome.seconds, job.run_dir
    print(
        "\n"
        f"task {job.task}: SCD policy success rate {100 * float(results['success_rate']):.0f}% over "
        f"{job.eval_episodes} episodes\n"
        f"per-step latency (batch 1, K={results['num_inference_steps']}): "
        f"p50 {float(results['latency_ms_p50']):.2f} ms, p90 {float(results['latency_ms_p90']):.2f} ms\n"
        f"wall time: collect {seconds['collect']:.0f} s, train {seconds['train']:.0f} s, "
        f"eval {seconds['eval']:.0f} s, total {seconds['total']:.0f} s\n"
        f"results {run_dir / 'eval.json'}, videos {run_dir / 'eval_videos'}, "
        f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
