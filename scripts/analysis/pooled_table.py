"""One ``scd-quality`` table from several sweeps of the same cells at different training seeds.

A sweep of issue H's table runs one training seed per session (fresh machines keep no runs), so its
seeds end up in separate ``scd-quality`` folders, each with its ``quality.json``. This pools their
rows the way ``scd-quality`` pools training seeds (``scd_policy.quality.pool_rows``: success over every
training x evaluation seed pair) and writes the table ``scd-quality`` itself would have written for all
the seeds at once (``quality.{json,md,png}``, per-category means included):

    .venv/bin/python scripts/analysis/pooled_table.py \\
        docs/results/h/metaworld10{,_seed1,_seed2}/quality.json --out docs/results/h/metaworld10_pooled

Tables of different budgets refuse to pool (demos, preset, steps, batch and episodes must agree).
Few-step rows (a distilled decoder's, ``few_step=``) are left out: they were run on some seeds only,
and their own sweep's table compares them with the K = 10 runs of the same seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scd_policy.quality import QualityConfig, is_few_step, pool_rows, write_table

BUDGET = ("demos", "size", "steps", "batch_size", "episodes_per_seed", "seeds", "n_action_steps")


def pooled_config(rows: list[dict[str, Any]], out: Path) -> QualityConfig:
    """The sweep configuration the pooled rows describe (what the table prints as its budget)."""
    budgets = {json.dumps([row.get(name) for name in BUDGET]) for row in rows}
    if len(budgets) != 1:
        raise SystemExit(f"the tables have different budgets {sorted(budgets)} ({', '.join(BUDGET)})")
    first = rows[0]

    def tasks(observation: str) -> list[str]:
        return list(dict.fromkeys(row["task"] for row in rows if row["observation"] == observation))

    return QualityConfig(
        out=str(out),
        tasks=tasks("state"),
        image_tasks=tasks("image"),
        policies=list(dict.fromkeys(row["policy"] for row in rows)),
        demos=first["demos"],
        size=first["size"],
        steps=first["steps"],
        batch_size=first["batch_size"],
        train_seeds=sorted({seed for row in rows for seed in row["train_seeds"]}),
        episodes=first["episodes_per_seed"],
        seeds=list(first["seeds"]),
        n_action_steps=first.get("n_action_steps"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tables", type=Path, nargs="+", help="scd-quality quality.json files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pooled quality.*")
    args = parser.parse_args()
    tables = [json.loads(path.read_text()) for path in args.tables]
    rows = pool_rows([row for table in tables for row in table["rows"] if not is_few_step(row)])
    cfg = pooled_config(rows, args.out)
    command = "pooled (scripts/analysis/pooled_table.py) from: " + "; ".join(
        f"{path}: {table['command']}" for path, table in zip(args.tables, tables, strict=True)
    )
    paths = write_table(rows, cfg, command)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
