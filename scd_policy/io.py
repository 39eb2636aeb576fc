"""Atomic file and directory writes: a crash or a full disk mid-write never leaves a half-written file
where a reader (or a resumed run) would trust it.

Temporaries live next to their target as ``.<name>.<random>.tmp`` (files and folders alike), so a kill
between creating and renaming one leaves only such a dot-name behind; :func:`remove_stale_temporaries`
clears them when a writer starts again. Files and folders get the permissions the process's umask
allows (``tempfile`` alone would make them private: 0600 / 0700), so a shared checkpoint stays readable
by whoever may read the folder it lives in.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


class DiskFullError(OSError):
    """No space left while writing ``filename`` (an ``OSError`` with errno ENOSPC and the path set)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device while writing {path}; free some space (or point the output "
            "elsewhere) and run again — files written before are intact",
            str(path),
        )

    def __str__(self) -> str:
        return str(self.strerror)


def current_umask() -> int:
    # os.umask can only be read by setting it; the lock keeps two threads from racing on that.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reraise_disk_full(error: OSError, path: Path) -> None:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(path) from error


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError):
            _reraise_disk_full(error, path)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    A previous ``path`` is moved aside first and deleted only after the new one is in place, so at
    every moment either the old or the new folder is complete. On error the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            _reraise_disk_full(error, Path(error.filename) if error.filename else path)
        raise
    old: Path | None = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: Path, name_glob: str = "*") -> list[Path]:
    """Delete ``.<name>.*.tmp`` files and folders left in ``folder`` by a writer that was killed.

    Call it only where no other writer can be at work in ``folder`` at the same time (a run folder
    owned by one training process). Returns what it removed.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for stale in folder.glob(f".{name_glob}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        removed.append(stale)
    return removed
