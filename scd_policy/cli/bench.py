"""``scd-bench``: latency, throughput, context-length and training-speed benchmarks (see ``--help``)."""

from __future__ import annotations

import logging
import shlex
import sys
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from scd_policy.bench import BenchConfig, run_suites, write_report
from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import config_dir

log = logging.getLogger("scd_policy.bench")


def run_bench(cfg: BenchConfig, command: str = "scd-bench") -> dict[str, Any]:
    """Run the configured suite(s) and write the report into ``cfg.out``; returns the results."""
    results = run_suites(cfg, after_suite=lambda partial: write_report(partial, cfg.out, command))
    paths = write_report(results, cfg.out, command)
    for row in results["rows"]:
        if row["mode"] != "open_loop":
            log.info(
                "%-10s %-16s K=%-4s history=%-4s batch=%-3s p50 %8.2f ms  p90 %8.2f ms  x%.2f vs scd",
                row["suite"],
                row["policy"],
                row["K"],
                row["history"],
                row["batch"],
                row["p50_ms"],
                row["p90_ms"],
                row["ratio_vs_scd"] or float("nan"),
            )
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return results


@hydra.main(config_path=str(config_dir()), config_name="bench", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    bench_cfg = to_object(cfg, BenchConfig)
    bench_cfg.size = HydraConfig.get().runtime.choices.get("size") or bench_cfg.size
    with user_errors("scd-bench"):
        run_bench(bench_cfg, "scd-bench " + shlex.join(sys.argv[1:]))


def main() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
