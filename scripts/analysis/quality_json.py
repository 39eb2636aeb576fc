"""Issue H's table as data: ``docs/results/quality.json`` from the runs committed under docs/results/.

The cells were trained in different sessions (one training seed per session, on fresh machines), so no
single ``scd-quality`` folder holds them all. This pools them the way ``scd-quality`` pools training
seeds (``scd_policy.quality.pool_rows``):

- ``scd-quality`` table files (``{"command", "rows"}``) are read as they are;
- H.3's window x lever cells come from ``docs/results/h/levers.json`` (``lever_table.py``), labelled
  with ``window`` and ``lever``;
- runs that were scored with ``scd-eval`` (another ``n_action_steps``, or a run trained before
  ``scd-quality`` existed) are turned into rows by ``scd_policy.quality.table_row`` with the budget
  they were trained with, listed in ``EVALUATED_RUNS`` below.

Usage: .venv/bin/python scripts/analysis/quality_json.py [--out docs/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from scd_policy.quality import Cell, QualityConfig, pool_rows, table_row

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
# Sweeps committed one folder per training seed: <sweep> (seed 0) and <sweep>_seed<k>. H.4's
# (scripts/sweeps/metaworld10.sh; seed 2's table also holds issue M.1's few-step rows, K = 2) and
# H.5's (scripts/sweeps/push_t_camera.sh, committed as push_t_camera_seed<k> from the start).
SEED_SWEEPS = ("metaworld10", "push_t_camera")


def seed_tables(sweep: str) -> list[Path]:
    """The scd-quality tables of one sweep's training seeds committed so far (not a pooled one)."""
    folder = re.compile(rf"{sweep}(_seed\d+)?")
    tables = (RESULTS / "h").glob(f"{sweep}*/quality.json")
    return sorted(table for table in tables if folder.fullmatch(table.parent.name))


def metaworld10_tables() -> list[Path]:
    """H.4's per-seed tables (the 2-step references of lever_table.py)."""
    return seed_tables("metaworld10")


# scd-quality rows, by the folder they are committed in.
TABLE_FILES = [
    "h/quality_push_t_scd_seed1.json",
    "h/quality_push_t_diffusion_policy.json",
    "h/quality_push_t_diffusion_policy_seed1.json",
    "h/quality_reach_around_diffusion_policy.json",
    "h/quality_reach_around_diffusion_policy_seed1.json",
    *(str(table.relative_to(RESULTS)) for sweep in SEED_SWEEPS for table in seed_tables(sweep)),
]
# H.3's window x lever cells, pooled and labelled (window, lever) by scripts/analysis/lever_table.py.
LEVER_TABLE = "h/levers.json"

# Runs scored by scd-eval, each with the budget it was trained with (the commands in docs/RESULTS.md,
# "Issue H"). reach_around's scd runs were trained before the task declared n_action_steps = 1 and
# are scored at 1, the default the diffusion_policy runs were trained and scored with.
PUSH_T = {"task": "push_t", "demos": 500, "size": "small", "steps": 20_000, "batch_size": 64}
REACH = {"task": "reach_around", "demos": 100, "size": "small", "steps": 10_000, "batch_size": 64}
REGRESSION = ["policy.diffusion.process=regression"]
EVALUATED_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("h/push_t_scd_500demos_20k_seed0_nexec8.json", {**PUSH_T, "policy": "scd", "seed": 0}),
    ("h/reach_around_scd_seed0_nexec1.json", {**REACH, "policy": "scd", "seed": 0, "nexec": 1}),
    ("h/reach_around_scd_seed1_nexec1.json", {**REACH, "policy": "scd", "seed": 1, "nexec": 1}),
    (
        "h/reach_around_regression_seed0_nexec1.json",
        {**REACH, "policy": "scd", "seed": 0, "nexec": 1, "overrides": REGRESSION},
    ),
]


def row_of_evaluated_run(results: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    cfg = QualityConfig(
        out="/nonexistent",  # no run folder: train_minutes is None (not recorded for these runs)
        tasks=[budget["task"]],
        image_tasks=[],
        policies=[budget["policy"]],
        demos=budget["demos"],
        size=budget["size"],
        steps=budget["steps"],
        batch_size=budget["batch_size"],
        train_seeds=[budget["seed"]],
        n_action_steps=budget.get("nexec"),
        overrides=list(budget.get("overrides", [])),
    )
    return table_row(cfg, Cell(budget["task"], image=False), budget["policy"], [results])


def upgraded(row: dict[str, Any]) -> dict[str, Any]:
    """Rows written before K, the decoder and the overrides were recorded: every such run sampled with
    the flow decoder at K = 10 (its scd-eval results say so) and had no overrides."""
    return {"num_inference_steps": 10, "decoder": "flow", "overrides": [], **row}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    sources: list[str] = []
    for name in TABLE_FILES:
        table = json.loads((RESULTS / name).read_text())
        rows += [upgraded(row) for row in table["rows"]]
        sources.append(f"{name}: {table['command']}")
    for name, budget in EVALUATED_RUNS:
        rows.append(row_of_evaluated_run(json.loads((RESULTS / name).read_text()), budget))
        sources.append(f"{name}: scd-eval of a run trained with {budget}")
    pooled = pool_rows(rows)
    levers = json.loads((RESULTS / LEVER_TABLE).read_text())["rows"]
    pooled += levers
    sources.append(f"{LEVER_TABLE}: scripts/analysis/lever_table.py (scd, window x lever)")
    args.out.write_text(json.dumps({"sources": sources, "rows": pooled}, indent=1) + "\n")
    for row in pooled:
        coverage = f", best coverage {row['best_coverage_mean']:.3f}" if "best_coverage_mean" in row else ""
        modes = row.get("success_modes")
        sides = " sides " + " / ".join(f"{100 * v:.0f}%" for _, v in sorted(modes.items())) if modes else ""
        variant = f"W={row['window']} {row['lever']}" if "lever" in row else " ".join(row["overrides"])
        print(
            f"{row['task']:>13} {row['policy']:>16} {variant:>36} seeds {row['train_seeds']}: "
            f"{100 * row['success_mean']:.1f}% ± {100 * row['success_std']:.1f}{coverage}{sides}"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
