"""Helpers shared by the Hydra command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TypeVar

from omegaconf import DictConfig

from scd_policy.config import ConfigError, resolve_config
from scd_policy.data.replay_buffer import DatasetError
from scd_policy.errors import debug_requested, describe_os_error
from scd_policy.policies.base import CheckpointError

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
        return resolve_config(cfg, schema)
    except ConfigError as error:
        raise SystemExit(f"configuration error: {error}") from None


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors a user can cause with what they pass or point at: each carries a message that names the
    file, key or value and the fix, so a command prints that one line instead of a traceback.
    (Imported here, not at the top: ``--help`` of a command must not wait for torch and zarr.)"""

    from envs.external import ExternalTaskError
    from scd_policy.serve.client import ServerConnectionError, ServerError

    return (
        ConfigError,
        ExternalTaskError,
        DatasetError,
        CheckpointError,
        FloatingPointError,
        ServerConnectionError,
        ServerError,
    )


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Turn an error the user can fix into ``<command>: error: <message>`` and exit status 1.

    Anything else (a bug) propagates with its traceback.
    """
    try:
        yield
    except user_error_types() as error:
        if debug_requested():
            raise
        raise SystemExit(f"{command}: error: {plain_message(error)}") from None
    except OSError as error:
        message = describe_os_error(error)
        if debug_requested() or message is None:
            raise
        raise SystemExit(f"{command}: error: {message}") from None
