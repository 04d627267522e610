"""A server under benchmark: a subprocess in its own process group, logging to a file."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx

from bench.procstat import tree_cpu_seconds

# The tree this benchmark runs from. A server (and the projections' child it starts) must import
# `audit` from here too: the virtualenv's `audit` script would import the checkout it was
# installed from, so a benchmark run from another worktree compared that checkout's server with
# its own projections.
TREE = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
# An exception's last traceback line, an ERROR log line, or an access-log line for a 5xx.
PROBLEM_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Violation)\w*: |^ERROR|\" 5\d\d ")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def audit_command() -> list[str]:
    """`audit`, as installed beside this Python (else through the module)."""
    script = Path(sys.executable).parent / "audit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "audit.cli"]


class ServerProcess:
    def __init__(
        self, name: str, command: list[str], env: dict[str, str], port: int, log: IO[bytes]
    ) -> None:
        self.name = name
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        if threading.current_thread() is threading.main_thread():
            # Killed (kill, timeout), the benchmark still runs its `finally`s: the server it
            # started, in a session of its own, is stopped, and its schema dropped.
            signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
        path = os.pathsep.join(filter(None, [str(TREE), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            command,
            env={**env, "PYTHONPATH": path},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, path: str = "/healthz") -> float:
        """Seconds until `path` answers 200."""
        started = time.monotonic()
        while time.monotonic() < started + STARTUP_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}{path}", timeout=2).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {STARTUP_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self._signal(signal.SIGKILL)  # any worker left behind in the group

    def cpu_seconds(self) -> float:
        """User and system CPU of the server and its live descendants (workers, projections)."""
        return tree_cpu_seconds(self.process.pid)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def problems(self) -> list[str]:
        """What the log reports going wrong: traceback count, exception lines, errors, 5xx."""
        lines = self.log_text().splitlines()
        tracebacks = sum(line.startswith("Traceback") for line in lines)
        found = [f"{tracebacks} traceback(s) in the server log"] if tracebacks else []
        return found + [line for line in lines if PROBLEM_LINE.search(line)]
