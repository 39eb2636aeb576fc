"""``scd-collect``: record scripted-expert demonstrations of a task into a zarr replay buffer.

The engine is :mod:`scd_policy.collection`; this is its Hydra shell (``scd-collect --help``).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from scd_policy.collection import EXIT_USAGE, CollectConfig, config_from_dict, run_collection
from scd_policy.config import ConfigError, config_dir

log = logging.getLogger("scd_policy.collect")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="collect")
def _hydra_main(values: DictConfig) -> None:
    # Our messages only (not every library's INFO chatter), plain, on stderr next to the progress bar.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    try:
        cfg = config_from_dict(values)
    except ConfigError as exc:
        log.error("scd-collect: error: %s", exc)
        sys.exit(EXIT_USAGE)
    sys.exit(run_collection(cfg))


def main() -> None:
    """The ``scd-collect`` console script (Hydra parses ``key=value`` overrides from sys.argv)."""
    ConfigStore.instance().store(name="collect_schema", node=CollectConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
