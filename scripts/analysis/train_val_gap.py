"""How far trained runs overfit: training loss against validation loss, from their TensorBoard logs.

    .venv/bin/python scripts/analysis/train_val_gap.py --out docs/results/h/train_val_gap.json \\
        w2_seed2=<sweep>/runs/mw_stick_pull/scd/seed2 w32_ptp_seed1=<sweep>/.../scd/seed1 ...

Per run (``label=<run folder>``, the folder ``scd-train`` wrote, with ``tensorboard/`` in it): the
training loss at the end (mean of the last 10% of its logged points, which are noisy per batch), the
validation loss at the end and at its minimum (and that step), and their ratio. A history that lets the
policy tell the demonstrations apart shows as a training loss far below the validation loss and a
validation loss that rises well before the end. Losses are comparable between runs of one recipe only:
a longer window or past-token prediction averages the loss over other targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def loss_summary(run: Path) -> dict[str, Any]:
    logs = EventAccumulator(str(run / "tensorboard"))
    logs.Reload()
    scalars = logs.Tags()["scalars"]
    for tag in ("train/loss", "val/loss"):
        if tag not in scalars:
            raise SystemExit(
                f"{run}/tensorboard has no {tag!r} (tags: {scalars}); was it trained with validation?"
            )
    train = [event.value for event in logs.Scalars("train/loss")]
    val = [(event.step, event.value) for event in logs.Scalars("val/loss")]
    tail = train[-max(1, len(train) // 10) :]
    best_step, best = min(val, key=lambda point: point[1])
    final_step, final = val[-1]
    train_final = sum(tail) / len(tail)
    return {
        "run": str(run),
        "train_loss_final": train_final,
        "val_loss_final": final,
        "val_loss_min": best,
        "val_min_step": best_step,
        "final_step": final_step,
        "val_over_train": final / train_final,
        "val_rise_from_min": final / best - 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="label=<run folder>")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected label=<run folder>, got {spec!r}")
        rows.append({"label": label, **loss_summary(Path(folder))})
    header = ("run", "train end", "val end", "val min (step)", "val/train", "val rise")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (16, 10, 8, 16, 9, 8), strict=True)))
    for row in rows:
        print(
            f"{row['label']:>16} {row['train_loss_final']:10.4f} {row['val_loss_final']:8.4f} "
            f"{row['val_loss_min']:8.4f} ({row['val_min_step']:>5}) {row['val_over_train']:9.2f} "
            f"{row['val_rise_from_min']:+8.0%}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"command": "scripts/analysis/train_val_gap.py", "rows": rows}, indent=2)
        )
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
