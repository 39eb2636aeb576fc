"""Success and smoothness of a trained policy under an injected delay (issue K, docs/deployment.md).

For every latency budget d (a chunk planned at tick t used from t + d on) and every way of joining
chunks (open loop with a plain switch, with the blended seam, with the new chunk inpainted onto the old
one, or temporal ensembling with a new chunk every tick) this runs ``scd-eval``'s evaluation and
writes one row per setting:

    python scripts/analysis/delay_curve.py --checkpoint RUN --out docs/results/delay_curve.json \
        [--task reach_around] [--delays 0 1 2 3 4] [--episodes 50] [--seeds 0 1 2]

Rows: {delay, mode, success_rate, success_rate_std, action_jerk, max_action_jump, success_modes, ...}.
A plot goes next to the JSON (same stem, .png).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from scd_policy.evaluation import EvalRunConfig, run_evaluation
from scd_policy.io import atomic_write_text

MODES = {
    "switch": {"seam": "switch"},
    "blend": {"seam": "blend"},
    "inpaint": {"seam": "inpaint"},
    "ensemble": {"replan_every_step": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default=None, help="the task (default: the one the run recorded)")
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-envs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    for delay in args.delays:
        for mode, options in MODES.items():
            results = run_evaluation(
                EvalRunConfig(
                    checkpoint=args.checkpoint,
                    task=args.task,
                    out=str(out.with_name(f"{out.stem}_{mode}_d{delay}.json")),
                    episodes=args.episodes,
                    seeds=list(args.seeds),
                    n_envs=args.n_envs,
                    videos=0,
                    latency_ticks=delay,
                    **options,  # type: ignore[arg-type]
                )
            )
            keep = ("success_rate", "success_rate_std", "action_jerk", "max_action_jump", "success_modes")
            rows.append({"delay": delay, "mode": mode, **{k: results[k] for k in keep if k in results}})
            atomic_write_text(out, json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        part = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["delay"])
        delays = [r["delay"] for r in part]
        axes[0].plot(delays, [100 * r["success_rate"] for r in part], marker="o", label=mode)
        axes[1].plot(delays, [r["max_action_jump"] for r in part], marker="o", label=mode)
    axes[0].set(xlabel="injected delay (ticks)", ylabel="success (%)", title="Success vs delay")
    axes[1].set(
        xlabel="injected delay (ticks)", ylabel="largest tick-to-tick jump", title="Seam jumps vs delay"
    )
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
