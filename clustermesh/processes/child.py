"""Child processes of the demo and the lab: started with a log file, ready when a log line says so, stopped by PID.

Readiness is a line the child prints (a regex), not a sleep. A child that exits before it is ready raises with the
end of its log. Stopping is SIGTERM, then SIGKILL after a grace period, always by the PID we started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "ChildFailed"]


class ChildFailed(RuntimeError):
    """A child process did not get ready; the message carries the end of its log."""


@dataclass
class Child:
    name: str
    command: list[str]
    log_file: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _offset: int = field(default=0, init=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )

    def log(self) -> str:
        if not self.log_file.exists():
            return ""
        with self.log_file.open("rb") as handle:
            handle.seek(self._offset)
            return handle.read().decode(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for(self, pattern: str, *, timeout: float = 30.0, also: Callable[[], bool] | None = None) -> re.Match[str]:
        """Until the child's log (since its start) matches `pattern` (and `also()` holds, when given: a port that
        accepts, say)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            match = regex.search(self.log())
            if match and (also is None or also()):
                return match
            if self.process is not None and self.process.poll() is not None:
                raise ChildFailed(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} did not log {pattern!r} within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(delay)  # a child's log file offers nothing to wait on
            delay = min(delay * 2, 0.1)

    def kill(self) -> None:
        """SIGKILL, by the PID we started: a crash, as far as the child's peers can tell."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self, *, grace: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code
