"""Webhook appends and projection steps sharing one store (`audit.storage.AppendsFirst`).

On SQLite both need the file's one write lock. Steps took it batch after batch, and an append
waiting in SQLite's busy handler seldom found it free: during `audit rebuild --all` webhooks fell
from about 1,050/s to 46/s, with waits of up to 2.9 s (bench/busy_rebuild.py). Now an append
says it is coming and a step lets it go first. PostgreSQL's appends never wait for a step.

Each test has two AuditLogs on one store, as the API process and the projections' process have.
"""

from __future__ import annotations

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


def test_an_append_waits_for_the_step_under_way_only_on_sqlite(
    log: AuditLog, projections_log: AuditLog
) -> None:
    db = projections_log.db
    step_open, end_step = threading.Event(), threading.Event()

    def step() -> None:
        with db.stepping(), db.transaction() as cursor:
            cursor.execute(db.sql(f"SELECT COUNT(*) AS n FROM {db.table(db.events_table)}"))
            step_open.set()
            end_step.wait(60)

    step_done = in_thread(step)
    assert step_open.wait(60)
    recorded = in_thread(lambda: log.record(many_users(1)))
    try:
        if isinstance(log.database, SqliteDatabase):
            assert not recorded.wait(NOT_YET_SECONDS), "the append went in during the step"
        else:
            assert recorded.wait(60), "a PostgreSQL append waited for a projection step"
    finally:
        end_step.set()
    assert step_done.wait(60)
    assert recorded.wait(60)
    assert Projector(projections_log).run_once() > 0
