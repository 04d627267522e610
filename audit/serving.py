"""How `audit serve` runs: the projections in a process of their own beside uvicorn.

Projections run beside the API as `audit project`, a child process, rather than as a thread of
the API process, where they held the GIL the webhook handlers wait for (bench/ingest.py, 32
clients on PostgreSQL: 540-602/s with the thread, 681-717/s with the child). On PostgreSQL the
child runs at a lower CPU priority, so that under load the webhooks are answered first and the
projections catch up as the load eases (its statements do not run niced: during a burst it also
waits, audit.projections.pace). (Not on SQLite: a projection step holds the file's one
write lock, and a slowed holder would hold up the webhooks' appends.)

The child has a session of its own, so a Ctrl-C meant for the server reaches only the server,
which then stops the child; and the child exits by itself if the server dies without stopping it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from types import TracebackType

from audit.config import Database, PostgresDatabase

logger = logging.getLogger(__name__)

PROJECTOR_NICENESS = 10  # on PostgreSQL only (see above)
PARENT_CHECK_SECONDS = 1.0
RESTART_DELAYS_SECONDS = (1.0, 10.0)  # the first, and the most after repeated failures
STOP_TIMEOUT_SECONDS = 15.0


class ProjectionProcess:
    """`audit project` as a child of this process, restarted whenever it exits unasked.

    Started on entering and stopped (SIGTERM, then SIGKILL after 15 s) on leaving the block.
    """

    def __init__(self, database: Database) -> None:
        self.niceness = PROJECTOR_NICENESS if isinstance(database, PostgresDatabase) else 0
        self.command = [sys.executable, "-m", "audit.cli", "project"]
        self.command += ["--exit-with-parent", str(os.getpid())]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._supervisor = threading.Thread(
            target=self._supervise, name="projection-supervisor", daemon=True
        )

    def __enter__(self) -> ProjectionProcess:
        self._supervisor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _supervise(self) -> None:
        first, most = RESTART_DELAYS_SECONDS
        delay = first
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                self._process = process = subprocess.Popen(self.command, start_new_session=True)
            started = time.monotonic()
            # If it is gone already, or this is not allowed, it still projects, hurried or not.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, process.pid, self.niceness)
            returncode = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > most:  # it ran well: this is a new failure
                delay = first
            # 0 is a clean stop: someone sent it SIGTERM or SIGINT.
            logger.log(
                logging.INFO if returncode == 0 else logging.ERROR,
                "projections process exited with %s; restarting in %.0f s",
                returncode,
                delay,
            )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, most)

    def stop(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C or SIGTERM must not cut this short and leave the child running.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._supervisor.is_alive():
            self._supervisor.join()


def stop_when_orphaned(stop: threading.Event, parent: int) -> None:
    """Set `stop` once this process's parent, `parent`, is gone (it is then re-parented). The
    parent names itself: it may be gone before this process has got this far."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                logger.warning("projections: the serving process is gone; stopping")
                stop.set()
            if stop.wait(PARENT_CHECK_SECONDS):
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def stop_with_spawning_parent() -> None:
    """In a process spawned by multiprocessing (a uvicorn worker of `audit serve --workers N`):
    SIGTERM this process, a graceful stop, once the parent is gone. A parent killed outright
    (`kill -9`) otherwise left its workers taking webhooks with nothing projecting them, and
    holding the port, so that a restarted server could not bind it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # its sentinel: ready exactly when the parent has exited
        logger.warning("the serving process is gone; this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
