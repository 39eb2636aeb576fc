"""``scd-serve`` as a child process: start it, learn its URL from its log, stop it (tests, benchmarks)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_LISTENING = re.compile(r"serving \S+ on (ws://[\w.\-]+:\d+)")


class ServerProcess:
    """``with ServerProcess(checkpoint, ["batching=false"]) as server: PolicyClient(server.url)``.

    Runs ``python -m scd_policy.cli.serve checkpoint=... port=<port> <overrides>`` with this Python
    (``port=0``: any free port), waits until it listens, and terminates it on exit. Its log lines are
    kept in ``log`` (and drained, so a chatty server never blocks on a full pipe).
    """

    def __init__(self, checkpoint: str | Path, overrides: Sequence[str] = (), *, port: int = 0) -> None:
        self.command = [
            sys.executable,
            "-m",
            "scd_policy.cli.serve",
            f"checkpoint={checkpoint}",
            f"port={port}",
            *overrides,
        ]
        self.log: list[str] = []
        self.url = ""
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        stderr = self.process.stderr
        assert stderr is not None
        found = threading.Event()

        def read() -> None:
            for line in stderr:
                self.log.append(line)
                match = _LISTENING.search(line)
                if match and not self.url:
                    self.url = match.group(1)
                    found.set()
            found.set()  # the process ended

        threading.Thread(target=read, daemon=True, name="scd-serve-log").start()
        if not found.wait(timeout_s) or not self.url:
            self.stop()
            raise RuntimeError("scd-serve did not start listening:\n" + "".join(self.log[-40:]))
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
