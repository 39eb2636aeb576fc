"""Helpers shared by the Hydra command-line entry points."""

from __future__ import annotations

import logging
import os
import sys
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scd_policy.config import ConfigError

T = TypeVar("T")


def setup_logging() -> None:
    # Hydra's own logging set-up is disabled in our configs (it would write files into the run dir).
    logging.basicConfig(
        level=os.environ.get("SCD_LOG_LEVEL", "INFO"),
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def to_object(cfg: DictConfig, schema: type[T]) -> T:
    """Resolve and validate a composed config; a bad value exits with a one-line explanation."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        raise SystemExit(f"configuration error: {error}") from None
    if not isinstance(obj, schema):
        raise SystemExit(f"configuration error: expected a {schema.__name__}, got {type(obj).__name__}")
    return obj
