"""Helpers of the server tests: a free port and a real ``scd-serve`` process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from scd_policy.serve.process import ServerProcess

TASK = "reach_around"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(checkpoint: Path, *args: str, port: int = 0) -> Iterator[tuple[str, ServerProcess]]:
    """A real ``scd-serve`` process (one torch thread); yields its URL and the process."""
    with ServerProcess(checkpoint, ["num_threads=1", *args], port=port) as server:
        yield server.url, server
