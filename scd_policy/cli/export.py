"""``scd-export``: export a trained scd policy's network to ONNX (``scd-export --help``).

The work is :func:`scd_policy.backends.onnx.run_export`; this is its Hydra shell.
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from scd_policy.backends.onnx import ExportConfig, run_export
from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import config_dir


@hydra.main(config_path=str(config_dir()), config_name="export", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors("scd-export"):
        run_export(to_object(cfg, ExportConfig))


def main() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
