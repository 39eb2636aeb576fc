"""Helpers of the server tests: a free port and a real ``scd-serve`` process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

TASK = "reach_around"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(checkpoint: Path, *args: str, port: int = 0) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real ``scd-serve`` process; yields its URL (read from its log) and the process."""
    command = [
        str(VENV_BIN / "scd-serve"),
        f"checkpoint={checkpoint}",
        f"port={port}",
        "num_threads=1",
        *args,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    lines: list[str] = []
    url = None
    for line in process.stderr:
        lines.append(line)
        found = re.search(r"on (ws://[\d.]+:\d+)", line)
        if found:
            url = found.group(1)
            break
    if url is None:
        process.wait(30)
        raise AssertionError("scd-serve did not start:\n" + "".join(lines))
    stderr = process.stderr
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()  # keep the pipe drained
    try:
        yield url, process
    finally:
        process.terminate()
        process.wait(30)
