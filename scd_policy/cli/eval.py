"""``scd-eval``: roll out a trained policy in its task's simulator (see ``scd-eval --help``).

The work is :func:`scd_policy.evaluation.run_evaluation`; this is its Hydra shell.
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import config_dir
from scd_policy.evaluation import EvalRunConfig, run_evaluation


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors("scd-eval"):
        run_evaluation(to_object(cfg, EvalRunConfig))


def main() -> None:
    ConfigStore.instance().store(name="eval_run_schema", node=EvalRunConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
