"""Error conventions shared by the library's entry points: which OS errors are the user's to fix (a full
disk, permissions) and how to say so in one line, and when to keep full tracebacks instead."""

from __future__ import annotations

import errno
import os

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


def describe_os_error(error: OSError) -> str | None:
    """One line for an OS error whose cause is outside the program (disk full, permissions, ...)
    naming the path; None for any other."""
    if error.errno not in _OS_ERRNOS:
        return None
    text = str(error)
    where = f" ({error.filename})" if error.filename and str(error.filename) not in text else ""
    return f"{_OS_ERRNOS[error.errno]}{where}: {text}"
