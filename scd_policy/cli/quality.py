"""``scd-quality``: the quality table of the three policies, task by task (see ``scd-quality --help``)."""

from __future__ import annotations

import shlex
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import config_dir, register_configs
from scd_policy.quality import QualityConfig, run_quality


@hydra.main(config_path=str(config_dir()), config_name="quality", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    quality_cfg = to_object(cfg, QualityConfig)
    quality_cfg.size = HydraConfig.get().runtime.choices.get("size") or quality_cfg.size
    with user_errors("scd-quality"):
        run_quality(quality_cfg, "scd-quality " + shlex.join(sys.argv[1:]))


def main() -> None:
    register_configs()  # the training configs the sweep composes for each run
    ConfigStore.instance().store(name="quality_schema", node=QualityConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
