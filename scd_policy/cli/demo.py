"""The README's main job: collect demonstrations -> train SCD -> evaluate in MuJoCo.

Until training and evaluation land (issue D), it checks the installation and says what is missing.
"""

from __future__ import annotations

import importlib.util


def main() -> int:
    import mujoco
    import torch
    import zarr

    versions = f"torch {torch.__version__}, mujoco {mujoco.__version__}, zarr {zarr.__version__}"
    print(f"scd-policy set-up OK: {versions}")
    missing = [
        name
        for name, module in (
            ("demonstration collection (issue B)", "scd_policy.cli.collect"),
            ("training (issue D)", "scd_policy.cli.train"),
            ("evaluation (issue D)", "scd_policy.cli.eval"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        print(
            "The main job (collect -> train -> evaluate) is not available yet; missing: " + ", ".join(missing)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
