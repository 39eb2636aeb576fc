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


def plain_message(error: BaseException) -> str:
    """The error's own message, without the worker traceback torch's DataLoader puts into it.

    An exception in a DataLoader worker is re-raised in the trainer as the same type, but with
    "Caught X in DataLoader worker process N. Original Traceback ..." as its text; the message the
    worker raised is the traceback's last entry.
    """
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def to_object(cfg: DictConfig, schema: type[T]) -> T:
    """Resolve and validate a composed config; a bad value exits with a one-line explanation."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        raise SystemExit(f"configuration error: {error}") from None
    if not isinstance(obj, schema):
        raise SystemExit(f"configuration error: expected a {schema.__name__}, got {type(obj).__name__}")
    return obj
