"""Helpers shared by the Hydra command-line entry points."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scd_policy.config import ConfigError
from scd_policy.data.replay_buffer import DatasetError
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


def to_object(cfg: DictConfig, schema: type[T]) -> T:
    """Resolve and validate a composed config; a bad value exits with a one-line explanation."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        raise SystemExit(f"configuration error: {error}") from None
    if not isinstance(obj, schema):
        raise SystemExit(f"configuration error: expected a {schema.__name__}, got {type(obj).__name__}")
    return obj


# Errors a user can cause with what they pass or point at: each carries a message that names the file,
# key or value and the fix, so a command prints that one line instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetError,
    CheckpointError,
    FloatingPointError,
)
# OS errors worth one line: the path is in the message, and the cause is outside the program.
_OS_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
}


def debug_requested() -> bool:
    """``SCD_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) keeps full tracebacks for bug reports."""
    return os.environ.get("SCD_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Turn an error the user can fix into ``<command>: error: <message>`` and exit status 1.

    Anything else (a bug) propagates with its traceback.
    """
    try:
        yield
    except USER_ERRORS as error:
        if debug_requested():
            raise
        raise SystemExit(f"{command}: error: {error}") from None
    except OSError as error:
        message = describe_os_error(error)
        if debug_requested() or message is None:
            raise
        raise SystemExit(f"{command}: error: {message}") from None


def describe_os_error(error: OSError) -> str | None:
    """One line for an OS error whose cause is outside the program (disk full, permissions, ...)
    naming the path; None for any other."""
    if error.errno not in _OS_ERRNOS:
        return None
    text = str(error)
    where = f" ({error.filename})" if error.filename and str(error.filename) not in text else ""
    return f"{_OS_ERRNOS[error.errno]}{where}: {text}"
