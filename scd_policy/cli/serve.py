"""``scd-serve``: serve a trained policy to robots and simulators over websockets (``scd-serve --help``).

The work is :class:`scd_policy.serve.PolicyServer` (via ``run_server``); this is its Hydra shell.
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import config_dir
from scd_policy.serve.server import ServeConfig, run_server


@hydra.main(config_path=str(config_dir()), config_name="serve", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors("scd-serve"):
        run_server(to_object(cfg, ServeConfig))


def main() -> None:
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
