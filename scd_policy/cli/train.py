"""``scd-train``: train a policy on a replay buffer (see ``scd-train --help``).

The run itself is :func:`scd_policy.training.experiment.run_training`; this is its Hydra shell. Under
``torchrun`` every rank runs it (DDP).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import ExperimentConfig, config_dir, register_configs
from scd_policy.training.experiment import run_training

log = logging.getLogger("scd_policy.train")


@hydra.main(config_path=str(config_dir()), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors("scd-train"):
        final = run_training(to_object(cfg, ExperimentConfig))
    log.info("done: %s", final)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
