"""Webhook appends and projection steps sharing one store (`audit.storage.AppendsFirst`).

On SQLite both need the file's one write lock. Steps took it batch after batch, and an append
waiting in SQLite's busy handler seldom found it free: during `audit rebuild --all` webhooks fell
from about 1,050/s to 46/s, with waits of up to 2.9 s (bench/busy_rebuild.py). Now an append
says it is coming and a step lets it go first. PostgreSQL's appends never wait for a step.

Each test has two AuditLogs on one store, as the API process and the projections' process have.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator

import pytest

from audit.application import AuditLog
from audit.config import Database, SqliteDatabase
from audit.projections.runner import Projector
from audit.storage import APPENDS_FIRST_SECONDS
from tests.test_cli import many_users

# Long enough that a step that did not wait would have finished: well under the step's limit.
NOT_YET_SECONDS = APPENDS_FIRST_SECONDS / 2


@pytest.fixture
def projections_log(database: Database, log: AuditLog) -> Iterator[AuditLog]:
    """The projections' process's AuditLog (on SQLite through another path to the file)."""
    if isinstance(database, SqliteDatabase):
        link = database.path.with_name("link.db")
        link.symlink_to(database.path)
        database = SqliteDatabase(path=link)
    other = AuditLog(database)
    try:
        yield other
    finally:
        other.close()


def in_thread(work: Callable[[], object]) -> threading.Event:
    """Set once `work` has returned (never, if it raised: the test fails on its wait)."""
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_a_projection_step_waits_for_an_announced_append(
    log: AuditLog, projections_log: AuditLog
) -> None:
    log.record(many_users(5))
    with log.db.appending():
        caught_up = in_thread(lambda: Projector(projections_log).run_once())
        if isinstance(log.database, SqliteDatabase):
            assert not caught_up.wait(NOT_YET_SECONDS), "the step did not wait for the append"
        # Under a constant stream of appends the steps still take their turns.
        assert caught_up.wait(60), "the steps never took their turn"
    assert {p["name"]: p["lag"] for p in Projector(projections_log).status()} == {
        "events": 0,
        "objects": 0,
        "timelines": 0,
    }


def test_an_append_waits_for_a_step_under_way_only_on_sqlite(
    log: AuditLog, projections_log: AuditLog
) -> None:
    """On SQLite the append waits on the steps' lock (not in SQLite's busy handler, which
    sleeps up to 100 ms a try), so it starts the moment the step ends. Only that lock is held
    here: SQLite's own is free."""
    with projections_log.db.stepping():
        recorded = in_thread(lambda: log.record(many_users(1)))
        if isinstance(log.database, SqliteDatabase):
            assert not recorded.wait(NOT_YET_SECONDS), "the append went in during the step"
        else:
            assert recorded.wait(60), "a PostgreSQL append waited for a projection step"
    assert recorded.wait(60)
    assert Projector(projections_log).run_once() > 0


def test_lock_files_that_cannot_be_opened_leave_appends_and_steps_unordered(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook must not fail because a lock file cannot be made (a directory the server's
    user may not write in; here, links to where no file can be). Each lock goes unused."""
    if not isinstance(database, SqliteDatabase):
        pytest.skip("the locks are files beside a SQLite store; PostgreSQL has none")
    for name in ("appends", "steps"):
        database.path.with_name(f"{database.path.name}-{name}.lock").symlink_to(
            database.path.parent / "missing" / "directory"
        )
    log = AuditLog(database)
    try:
        with caplog.at_level(logging.WARNING, logger="audit.storage"):
            log.record(many_users(3))
            assert Projector(log).run_once() > 0
        assert "webhooks and projection steps go unordered" in caplog.text
    finally:
        log.close()


def test_an_append_that_fails_to_open_a_lock_file_leaves_no_lock_held(
    database: Database,
) -> None:
    """It had taken the appends' lock before it failed to open the steps', and never let go:
    every step in every process then waited out its limit (found by review)."""
    if not isinstance(database, SqliteDatabase):
        pytest.skip("the locks are files beside a SQLite store; PostgreSQL has none")
    steps = database.path.with_name(f"{database.path.name}-steps.lock")
    steps.symlink_to(database.path.parent / "missing" / "directory")
    log = AuditLog(database)
    try:
        log.record(many_users(3))
        path = database.path.with_name(f"{database.path.name}-appends.lock")
        appends = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(appends, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
        finally:
            os.close(appends)
    finally:
        log.close()
