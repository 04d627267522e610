"""SPEC 5 / issue 4: exactly once, rebuilt equals live, versioned rebuilds, poison events.

Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit import queries, storage
from audit.aggregates.delivery import Delivery, parse_delivery
from audit.application import AuditLog
from audit.config import Database, SqliteDatabase
from audit.projections import runner
from audit.projections.base import StoredDelivery, Tables
from audit.projections.events import EventIndex
from audit.projections.objects import ObjectsProjection
from audit.projections.parallel import CatchUpFailed, catch_up_in_processes, groups
from audit.projections.runner import (
    RETIRED,
    NewerVersion,
    Projector,
    active_tables,
    all_projections,
    tracked_position,
    tracking_key,
)
from audit.projections.timelines import SessionTimelines
from audit.storage import Cursor, Db, StoreUnavailable, is_store_down, unavailable_reason
from tests.conftest import drop_postgres_schema, new_postgres_database
from tests.test_domain_state import organization_histories, user_histories
from tests.webhook_helpers import payload, payload_files

# Columns that record arrival (positions, receipt times, staleness), not what happened.
ARRIVAL_COLUMNS = {"position", "k3", "stale", "received_at", "listed_at"}


def sample_deliveries() -> list[Delivery]:
    return [
        parse_delivery(path.read_bytes(), svix_id=f"msg_s{i}", svix_timestamp=1, received_at=10 + i)
        for i, path in enumerate(payload_files())
    ]


def renamed(deliveries: list[Delivery], prefix: str) -> list[Delivery]:
    """Generated histories number their svix-ids from 0: keep two histories' ids apart."""
    return [dataclasses.replace(d, svix_id=f"{prefix}_{d.svix_id}") for d in deliveries]


def table_rows(db: Db, projection: str, *, drop: set[str] = frozenset()) -> dict[str, list]:
    """Every row of every table of the live generation, as sorted lists of dicts."""
    tables = active_tables(db, projection)
    result = {}
    for logical in {p.name: p for p in all_projections()}[projection].table_names:
        rows = db.fetchall(f"SELECT * FROM {tables[logical]}")
        result[logical] = sorted(
            (tuple(sorted((k, v) for k, v in dict(row).items() if k not in drop)) for row in rows),
            key=repr,
        )
    return result


def live_indexes(db: Db) -> set[str]:
    """Every index of every projection's live generation, as its definition minus the prefix."""
    shapes = set()
    for projection in all_projections():
        prefix = active_tables(db, projection.name).prefix
        if db.dialect == "sqlite":
            rows = db.fetchall("SELECT sql AS definition FROM sqlite_master WHERE type = 'index'")
        else:
            rows = db.fetchall(
                "SELECT indexdef AS definition FROM pg_indexes WHERE schemaname = %s",
                [db.schema],
            )
        shapes |= {
            row["definition"].replace(prefix, "p_")
            for row in rows
            if row["definition"] and prefix in row["definition"]
        }
    return shapes


def tables_without_statistics(db: Db) -> list[str]:
    """The live generation's tables that hold rows but have no planner statistics."""
    if db.dialect == "sqlite":
        has_stat = db.fetchone("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'")
        rows = db.fetchall("SELECT DISTINCT tbl AS name FROM sqlite_stat1") if has_stat else []
    else:
        rows = db.fetchall(
            "SELECT DISTINCT tablename AS name FROM pg_stats WHERE schemaname = %s", [db.schema]
        )
    analyzed = {row["name"] for row in rows}
    missing = []
    for projection in all_projections():
        tables = active_tables(db, projection.name)
        for name in projection.table_names:
            physical = tables[name].split(".")[-1].strip('"')
            holds_rows = db.fetchone(f"SELECT 1 AS found FROM {tables[name]} LIMIT 1")
            if holds_rows and physical not in analyzed:
                missing.append(physical)
    return missing


def all_rows(db: Db, *, drop: set[str] = frozenset()) -> dict[str, Any]:
    return {p.name: table_rows(db, p.name, drop=drop) for p in all_projections()}


@contextlib.contextmanager
def fresh_log(kind: str, tmp_path: Path, label: str) -> Iterator[AuditLog]:
    database: Database
    if kind == "sqlite":
        # uuid4, not random: hypothesis seeds `random` the same way for every example.
        database = SqliteDatabase(path=tmp_path / f"{label}-{uuid.uuid4().hex}.db")
    else:
        database = new_postgres_database()
    log = AuditLog(database)
    try:
        yield log
    finally:
        log.close()
        if kind != "sqlite":
            drop_postgres_schema(database)  # type: ignore[arg-type]


@settings(
    max_examples=3,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_rebuilt_equals_live(database: Database, tmp_path: Path, data: st.DataObject) -> None:
    kind = "sqlite" if isinstance(database, SqliteDatabase) else "postgresql"
    with fresh_log(kind, tmp_path, "rebuilt") as log:
        rebuilt_equals_live(log, data)


def rebuilt_equals_live(log: AuditLog, data: st.DataObject) -> None:
    projector = Projector(log, batch_size=7)
    deliveries = sample_deliveries()
    rng = random.Random(4)
    # Generated histories too: shuffled arrival, duplicates mixed in, followed live in small steps.
    for prefix, strategy in (("u", user_histories()), ("o", organization_histories())):
        deliveries += renamed(data.draw(strategy), prefix)
    rng.shuffle(deliveries)
    for start in range(0, len(deliveries), 5):
        log.record(deliveries[start : start + 5] + rng.sample(deliveries[: start + 5], 1))
        projector.run_once()
    live = all_rows(log.db)
    assert live["objects"]["changes"], "the histories must produce changes"
    indexes = live_indexes(log.db)
    assert any("changes" in index and "(field, " in index for index in indexes)

    for name in projector.projections:
        projector.rebuild(name)
    assert {row["state"] for row in projector.status()} == {"rebuilding"}
    projector.run_once()
    assert {row["state"] for row in projector.status()} == {"live"}
    assert all(row["lag"] == 0 and row["errors"] == 0 for row in projector.status())
    assert all_rows(log.db) == live
    # A build creates its read indexes only when it goes live; it must not go live without them,
    # nor without the statistics the planner needs to choose them.
    assert live_indexes(log.db) == indexes
    assert tables_without_statistics(log.db) == []


@settings(
    max_examples=6,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_late_stale_and_duplicate_deliveries_give_the_in_order_tables(
    database: Database, tmp_path: Path, data: st.DataObject
) -> None:
    kind = "sqlite" if isinstance(database, SqliteDatabase) else "postgresql"
    history = data.draw(user_histories()) + renamed(data.draw(organization_histories()), "o")
    arrived = list(data.draw(st.permutations(history)))
    for _ in range(data.draw(st.integers(0, 3))):
        arrived.insert(data.draw(st.integers(0, len(arrived))), data.draw(st.sampled_from(history)))
    results = []
    # Followed live in small batches, and then (the rebuild's case) all in one batch, where a
    # late arrival or a stub meets versions the batch itself has not written yet.
    for order, live in ((history, True), (arrived, True), (arrived, False)):
        with fresh_log(kind, tmp_path, "order") as log:
            projector = Projector(log, batch_size=3 if live else 1000)
            for delivery in order:
                log.record([delivery])
                if live:
                    projector.run_once()
            projector.run_once()
            results.append(all_rows(log.db, drop=ARRIVAL_COLUMNS))
    assert results[1] == results[0]
    assert results[2] == results[0]


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing treats it as a poison event."""


class CrashingIndex(EventIndex):
    def __init__(self, after: int) -> None:
        self.remaining = after

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        if len(events) > self.remaining:  # dies part-way through these events
            super().apply(cursor, t, db, events[: self.remaining])
            raise Crash()
        self.remaining -= len(events)
        super().apply(cursor, t, db, events)


@pytest.mark.parametrize("crash_after", [0, 3, 8])
def test_a_crash_inside_a_batch_applies_nothing_and_a_restart_continues(
    log: AuditLog, crash_after: int, tmp_path: Path
) -> None:
    deliveries = sample_deliveries()
    log.record(deliveries)
    crashing = Projector(log, [CrashingIndex(crash_after)], batch_size=10)
    with pytest.raises(Crash):
        crashing.run_once()
    # Batches before the crash are in; the batch it died in left nothing behind.
    rows = log.db.fetchall(f"SELECT position FROM {active_tables(log.db, 'events')['events']}")
    position = crashing.status()[0]["position"]
    assert len(rows) == (crash_after // 5) * 5  # each batch of 10 positions holds 5 deliveries
    assert all(row["position"] <= position for row in rows)

    Projector(log, [EventIndex()], batch_size=10).run_once()
    with fresh_log(log.db.dialect, tmp_path, "c") as clean:
        clean.record(deliveries)
        Projector(clean, [EventIndex()]).run_once()
        assert table_rows(log.db, "events") == table_rows(clean.db, "events")


def test_a_crash_between_batches_resumes_exactly_once(log: AuditLog) -> None:
    deliveries = sample_deliveries()
    log.record(deliveries)
    projector = Projector(log, batch_size=4)
    projector.step(projector.projections["events"], 1)
    projector.step(projector.projections["events"], 1)
    # A new process picks up from the recorded position.
    Projector(log, batch_size=4).run_once()
    rows = log.db.fetchall(f"SELECT svix_id FROM {active_tables(log.db, 'events')['events']}")
    assert sorted(r["svix_id"] for r in rows) == sorted(d.svix_id for d in deliveries)


def stored_tables(db: Db, prefix: str = "") -> list[str]:
    with db.reader() as cursor:
        return db.table_names(cursor, prefix)


class EventIndexRaised(EventIndex):
    version = EventIndex.version + 1


def test_a_version_bump_builds_beside_the_live_one_and_switches_atomically(log: AuditLog) -> None:
    log.record(sample_deliveries()[:10])
    Projector(log, [EventIndex()]).run_once()
    v1_tables = active_tables(log.db, "events")
    v1_rows = table_rows(log.db, "events")
    v1_position = log.recorder.max_notification_id()
    assert len(v1_rows["events"]) == 10
    with log.db.transaction() as cursor:  # a table that only the old version had
        cursor.execute(f"CREATE TABLE {v1_tables['retired']} (x INTEGER)")

    old, new = EventIndex.version, EventIndexRaised.version
    upgraded = Projector(log, [EventIndexRaised()], batch_size=4)
    (status,) = upgraded.status()
    assert status["state"] == "rebuilding" and status["version"] == new
    assert status["serving_version"] == old
    # Part-way through the build, reads still use v1 and see everything.
    upgraded.step(upgraded.projections["events"], 2)
    log.record(sample_deliveries()[10:12])
    assert active_tables(log.db, "events").prefix == v1_tables.prefix
    assert len(table_rows(log.db, "events")["events"]) == 10
    # The status says both: the build's progress, and the lag of what reads use.
    (status,) = upgraded.status()
    assert (status["lag"], status["serving_lag"]) == (10, 2)  # 4 records read: 2 deliveries
    assert status["serving_position"] == v1_position

    upgraded.run_once()
    (status,) = upgraded.status()
    live = {"state": "live", "version": new, "lag": 0, "serving_version": new, "serving_lag": 0}
    assert status == status | live and status["serving_position"] == status["position"]
    assert active_tables(log.db, "events").prefix != v1_tables.prefix
    assert len(table_rows(log.db, "events")["events"]) == 12
    with pytest.raises(Exception):  # noqa: B017 - the old generation's tables are gone
        log.db.fetchall(f"SELECT * FROM {v1_tables['events']}")
    left, retired = stored_tables(log.db, v1_tables.prefix), stored_tables(log.db, RETIRED)
    assert left == [], "every table of the old generation is dropped, known to this version or not"
    assert retired == [], "renamed out of reads' way at the switch, then dropped"


@contextlib.contextmanager
def following(projector: Projector, recheck_seconds: float = 0.1) -> Iterator[None]:
    """`projector.run_forever` in a thread for the block, looking often: as the projections
    process of `audit serve` follows the store."""
    stop = threading.Event()
    thread = threading.Thread(
        target=projector.run_forever,
        args=(stop,),
        kwargs={"poll_seconds": 0.05, "recheck_seconds": recheck_seconds},
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def wait_until(done: Callable[[], bool], failure: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def test_tables_a_switch_retired_but_did_not_drop_are_dropped_at_the_next_start(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch renames the old generation's tables (quick: on SQLite every statement holds
    the one write lock that webhooks wait for), then drops them, each in a transaction of its
    own. A process that ends between the two leaves them: the next start drops them."""
    log.record(sample_deliveries()[:10])
    Projector(log, [EventIndex()]).run_once()
    v1_prefix = active_tables(log.db, "events").prefix
    upgraded = Projector(log, [EventIndexRaised()])
    monkeypatch.setattr(upgraded, "_drop_retired", lambda name=None: None)  # it ends here
    upgraded.run_once()

    retired = stored_tables(log.db, RETIRED)
    assert retired and all(name.startswith(RETIRED + v1_prefix) for name in retired)
    assert not stored_tables(log.db, v1_prefix)
    assert len(table_rows(log.db, "events")["events"]) == 10  # reads use the new generation

    Projector(log, [EventIndexRaised()])  # the next start
    assert not stored_tables(log.db, RETIRED)
    assert len(table_rows(log.db, "events")["events"]) == 10


def test_a_running_follower_drops_tables_a_switch_retired_but_did_not_drop(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit rebuild` stopped between its switch and its drops (Ctrl-C: dropping `objects` at
    a million events takes seconds) leaves retired tables; the projections process of a
    running `audit serve` starts only once, so it drops them as it follows."""
    log.record(sample_deliveries()[:10])
    follower = Projector(log, [EventIndex()])
    follower.run_once()
    interrupted = Projector(log, [EventIndex()])  # as in another process
    monkeypatch.setattr(interrupted, "_drop_retired", lambda name=None: None)  # it ends here
    interrupted.rebuild("events")
    interrupted.run_once()

    assert stored_tables(log.db, RETIRED)
    with following(follower):
        wait_until(lambda: not stored_tables(log.db, RETIRED), "the follower never dropped them")


def test_a_new_rebuild_renames_the_build_it_replaces_and_drops_it_after_its_switch(
    log: AuditLog,
) -> None:
    """`audit rebuild` over a build left part-way dropped that build's tables in the
    transaction that started the new one: on SQLite, the one write lock webhooks wait for,
    held for as long as a large build takes to drop. It renames them there, as a switch does,
    and they are dropped with what the switch retires, each in a transaction of its own."""
    log.record(sample_deliveries()[:10])
    projector = Projector(log, [EventIndex()], batch_size=4)
    projector.run_once()
    live_prefix = active_tables(log.db, "events").prefix
    left = projector.rebuild("events")
    projector.step(projector.projections["events"], left)  # part-way, then stopped
    left_prefix = Tables(log.db, "events", left).prefix

    assert stored_tables(log.db, left_prefix)
    built = projector.rebuild("events")
    assert built == left + 1
    retired = stored_tables(log.db, RETIRED)
    assert retired and all(name.startswith(RETIRED + left_prefix) for name in retired)
    assert not stored_tables(log.db, left_prefix)

    projector.run_once()  # the build caught up and switched
    assert active_tables(log.db, "events").generation == built
    assert not any(
        name.startswith((RETIRED, left_prefix, live_prefix)) for name in stored_tables(log.db)
    )
    assert len(table_rows(log.db, "events")["events"]) == 10
    [status] = projector.status()
    assert (status["state"], status["lag"], status["errors"]) == ("live", 0, 0)


def test_an_older_release_s_rebuild_is_refused_and_if_forced_built_over_again(
    log: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    """An older release's `audit rebuild` switched reads back to its version, and a running
    newer process then stepped neither generation, silently, until restarted (review E)."""
    log.record(sample_deliveries()[:10])
    newer = Projector(log, [EventIndexRaised()])
    newer.run_once()
    older = Projector(log, [EventIndex()])
    with pytest.raises(NewerVersion):
        older.rebuild("events")
    assert newer.registration("events").building_generation is None
    older.rebuild("events", downgrade=True)  # a roll-back on purpose, or an older `rebuild`
    older.run_once()
    assert newer.registration("events").version == EventIndex.version
    log.record(sample_deliveries()[10:12])
    with caplog.at_level(logging.WARNING, logger="audit.projections"):
        newer.run_once()
    registration = newer.registration("events")
    assert (registration.version, registration.building_version) == (EventIndexRaised.version, None)
    assert len(table_rows(log.db, "events")["events"]) == 12
    [warning] = [r.getMessage() for r in caplog.records if r.name == "audit.projections"]
    assert warning == (
        f"projection events: reads use v{EventIndex.version}, older than this release's;"
        f" building v{EventIndexRaised.version} again"
    )


class EventIndexRaisedTwice(EventIndex):
    version = EventIndex.version + 2


def test_a_build_of_a_newer_version_under_way_is_left_alone(log: AuditLog) -> None:
    """Two releases newer than the store each dropped the other's build every round, so
    neither finished; a rebuild by a release older than the build dropped it (review G)."""
    log.record(sample_deliveries()[:10])
    Projector(log, [EventIndex()]).run_once()
    newest = Projector(log, [EventIndexRaisedTwice()], batch_size=4)
    building = newest.registration("events")
    assert building.building_version == EventIndexRaisedTwice.version
    newer = Projector(log, [EventIndexRaised()], batch_size=4)
    newer.run_once()  # steps nothing of its own, drops nothing
    assert newer.registration("events") == building
    older = Projector(log, [EventIndex()])
    with pytest.raises(NewerVersion):
        older.rebuild("events")
    newest.run_once()
    registration = newest.registration("events")
    assert (registration.version, registration.building_version) == (
        EventIndexRaisedTwice.version,
        None,
    )
    assert len(table_rows(log.db, "events")["events"]) == 10


def test_an_older_release_leaves_newer_reads_be_and_says_so_once(
    log: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    log.record(sample_deliveries()[:10])
    newer = Projector(log, [EventIndexRaised()])
    newer.run_once()
    registration = newer.registration("events")
    older = Projector(log, [EventIndex()])
    log.record(sample_deliveries()[10:12])
    with caplog.at_level(logging.WARNING, logger="audit.projections"):
        older.run_once()
        older.run_once()
    assert newer.registration("events") == registration
    assert len(table_rows(log.db, "events")["events"]) == 10  # not stepped by the older code
    warnings = [r.getMessage() for r in caplog.records if r.name == "audit.projections"]
    assert warnings == [
        f"projection events: reads use v{EventIndexRaised.version}, newer than this release's"
        f" v{EventIndex.version}, which cannot apply it: they fall behind the store until a"
        f" release that knows v{EventIndexRaised.version} steps them"
    ]
    newer.run_once()
    assert len(table_rows(log.db, "events")["events"]) == 12


def test_a_forced_rebuild_leaves_the_live_generation_following_the_store(log: AuditLog) -> None:
    """SPEC 5: the live generation keeps serving while the build runs; what it serves must not
    stop at the position the rebuild started from (at 1,000,000 events, ten minutes)."""
    deliveries = sample_deliveries()
    projector = Projector(log, batch_size=5)
    log.record(deliveries[:-1])
    projector.run_once()
    live = active_tables(log.db, "events").generation
    built = projector.rebuild("events")
    arriving = deliveries[-1]
    served_by_live: list[bool] = []

    def progress(name: str, count: int) -> None:
        if not served_by_live:
            log.record([arriving])  # a webhook arrives while the build is under way
        assert active_tables(log.db, "events").generation == live  # reads not switched yet
        served_by_live.append(queries.event_by_id(log, arriving.svix_id) is not None)

    projector.catch_up(projector.projections["events"], progress=progress)
    assert len(served_by_live) > 3, "the build must take several rounds"
    assert served_by_live[-1], "the live generation did not apply what arrived during the build"
    assert active_tables(log.db, "events").generation == built
    assert queries.event_by_id(log, arriving.svix_id) is not None
    [status] = [row for row in projector.status() if row["name"] == "events"]
    assert status["lag"] == 0 and status["state"] == "live"


def test_while_a_build_catches_up_the_other_projections_keep_following(log: AuditLog) -> None:
    """Found by review: in `audit rebuild --all`, once `events` and `timelines` had switched,
    neither they nor a follower's live generations were stepped again until the `objects` build
    (the longest, by minutes) had caught up: their reads stood still meanwhile."""
    deliveries = sample_deliveries()
    log.record(deliveries[:-3])
    projector = Projector(log, batch_size=5)
    projector.run_once()
    projector.rebuild("objects")
    arrivals = iter(deliveries[-3:])
    pending: list[str] = []
    served: list[bool] = []

    def progress(name: str, count: int) -> None:
        assert name == "objects"  # only the build's steps are told while one runs
        served.extend(queries.event_by_id(log, svix_id) is not None for svix_id in pending)
        pending.clear()
        arriving = next(arrivals, None)
        if arriving is not None:  # a webhook arrives while the build is under way
            log.record([arriving])
            pending.append(arriving.svix_id)

    projector.catch_up(*projector.projections.values(), progress=progress)
    assert served == [True, True, True], "events did not follow the store beside the build"


def test_a_rebuild_does_not_also_step_a_live_generation_that_is_behind_it(log: AuditLog) -> None:
    """A live generation at the build's position or behind it would only repeat the build's
    work (a bench store's never-stepped generation 1 doubled a 1,000,000-event rebuild)."""
    log.record(sample_deliveries())
    projector = Projector(log, batch_size=5)  # registers generation 1, at position 0
    built = projector.rebuild("events")
    live_positions: list[int] = []

    def progress(name: str, count: int) -> None:
        with log.db.reader() as cursor:
            live_positions.append(tracked_position(projector.db, cursor, tracking_key("events", 1)))

    projector.catch_up(projector.projections["events"], progress=progress)
    assert len(live_positions) > 3 and set(live_positions) == {0}
    assert active_tables(log.db, "events").generation == built


def test_a_follower_carries_on_a_build_left_part_way_though_nothing_new_arrives(
    log: AuditLog,
) -> None:
    """`audit rebuild` interrupted (Ctrl-C) leaves its build registered and part-way; the
    projector of a running `audit serve` must finish it without waiting for a delivery."""
    log.record(sample_deliveries())
    follower = Projector(log)
    follower.run_once()
    with following(follower):
        interrupted = Projector(log, batch_size=5)  # as in another process
        built = interrupted.rebuild("events")
        interrupted.step(interrupted.projections["events"], built)
        wait_until(
            lambda: active_tables(log.db, "events").generation == built,
            "the follower never carried on the build",
        )
    [status] = [row for row in follower.status() if row["name"] == "events"]
    assert status["state"] == "live" and status["lag"] == 0


class PausingIndex(EventIndex):
    """Holds its step (and so the tracking row's lock) open until `go` is set."""

    def __init__(self) -> None:
        self.inside, self.go = threading.Event(), threading.Event()

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        super().apply(cursor, t, db, events)
        self.inside.set()
        assert self.go.wait(30)


def test_a_switch_waits_for_a_step_of_its_build_in_another_process(log: AuditLog) -> None:
    """`audit serve`'s child and `audit rebuild` may step the same build: the switch must not
    apply the events of a batch the other is committing (each would be a projection error).
    PostgreSQL only: SQLite's writer lock serialises the two transactions before either reads."""
    if log.db.dialect == "sqlite":
        pytest.skip("SQLite takes its writer lock at BEGIN; the two cannot interleave")
    log.record(sample_deliveries())
    switching = Projector(log, [EventIndex()], batch_size=10)
    built = switching.rebuild("events")
    pausing = PausingIndex()
    other = Projector(log, [pausing], batch_size=10)
    stepping = threading.Thread(target=other.step, args=(pausing, built))
    stepping.start()
    assert pausing.inside.wait(30)  # the other's batch is written, not committed
    switch = threading.Thread(
        target=switching._switch, args=(switching.projections["events"], built)
    )
    switch.start()
    deadline = time.monotonic() + 30
    while not _waiting_for_a_lock(log.db) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the switch is held by the other's transaction
    pausing.go.set()
    stepping.join(30)
    switch.join(30)
    assert active_tables(log.db, "events").generation == built
    [status] = switching.status()
    assert status["errors"] == 0 and status["lag"] == 0
    rows = log.db.fetchall(f"SELECT svix_id FROM {active_tables(log.db, 'events')['events']}")
    assert sorted(r["svix_id"] for r in rows) == sorted(d.svix_id for d in sample_deliveries())


class HalfwayIndex(EventIndex):
    """Holds its step open having read one of its tables, before writing them all."""

    def __init__(self, first: str) -> None:
        self.first = first
        self.inside, self.go = threading.Event(), threading.Event()

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        cursor.execute(f"SELECT 1 FROM {t[self.first]} LIMIT 1")
        self.inside.set()
        assert self.go.wait(30)
        super().apply(cursor, t, db, events)


def test_a_new_rebuild_waits_for_a_step_of_the_build_it_replaces(log: AuditLog) -> None:
    """Found by review: `audit rebuild` while a follower carried on a left build failed with
    "deadlock detected": it dropped the build's tables while the follower's step, having
    written some, went on to the others. PostgreSQL only, as above."""
    if log.db.dialect == "sqlite":
        pytest.skip("SQLite takes its writer lock at BEGIN; the two cannot interleave")
    log.record(sample_deliveries())
    rebuilding = Projector(log, [EventIndex()], batch_size=10)
    left = rebuilding.rebuild("events")
    # The table a new rebuild drops last: the step holds it.
    last = stored_tables(log.db, f"p_events_g{left}_")[-1]
    halfway = HalfwayIndex(last.removeprefix(f"p_events_g{left}_"))
    follower = Projector(log, [halfway], batch_size=10)
    stepping = threading.Thread(target=follower.step, args=(halfway, left))
    stepping.start()
    assert halfway.inside.wait(30)
    rebuilt: list[int] = []
    rebuild = threading.Thread(target=lambda: rebuilt.append(rebuilding.rebuild("events")))
    rebuild.start()
    deadline = time.monotonic() + 30
    while not _waiting_for_a_lock(log.db) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the rebuild waits on the follower's step
    halfway.go.set()
    stepping.join(30)
    rebuild.join(30)
    assert rebuilt == [left + 1]
    rebuilding.run_once()
    [status] = rebuilding.status()
    assert (status["state"], status["lag"], status["errors"]) == ("live", 0, 0)


def test_a_switch_waits_for_a_step_of_the_generation_it_retires(log: AuditLog) -> None:
    """Found by review: the switch renamed the live generation's tables, then deleted its
    tracking row; a follower's step of it, holding that row and having read only the last of
    those tables, then wrote another: "deadlock detected". PostgreSQL only, as above."""
    if log.db.dialect == "sqlite":
        pytest.skip("SQLite takes its writer lock at BEGIN; the two cannot interleave")
    log.record(sample_deliveries()[:10])
    Projector(log, [EventIndex()]).run_once()
    live = active_tables(log.db, "events")
    switching = Projector(log, [EventIndex()], batch_size=1000)
    built = switching.rebuild("events")
    switching.step(switching.projections["events"], built)  # caught up: the switch is next
    log.record(sample_deliveries()[10:12])
    last = stored_tables(log.db, live.prefix)[-1]  # the switch renames it last: the step holds it
    halfway = HalfwayIndex(last.removeprefix(live.prefix))
    follower = Projector(log, [halfway], batch_size=1000)
    failures: list[BaseException] = []

    def run(work: Callable[[], object]) -> None:
        try:
            work()
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    stepping = threading.Thread(target=run, args=(lambda: follower.step(halfway, live.generation),))
    stepping.start()
    assert halfway.inside.wait(30)
    switch = threading.Thread(
        target=run, args=(lambda: switching._switch(switching.projections["events"], built),)
    )
    switch.start()
    wait_until(lambda: _waiting_for_a_lock(log.db), "the switch never waited for the step")
    halfway.go.set()
    stepping.join(30)
    switch.join(30)
    assert failures == []
    assert active_tables(log.db, "events").generation == built
    [status] = switching.status()
    assert (status["state"], status["lag"], status["errors"]) == ("live", 0, 0)


def _waiting_for_a_lock(db: Db) -> bool:
    row = db.fetchone(
        "SELECT COUNT(*) AS n FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return bool(row["n"])


class CommitSettingWitness(EventIndex):
    """An event index that notes how each step's transaction will commit."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        cursor.execute("SELECT current_setting('synchronous_commit') AS setting")
        self.seen.append(cursor.fetchone()["setting"])
        super().apply(cursor, t, db, events)


def test_a_step_commits_without_waiting_for_the_flush_and_other_transactions_wait(
    log: AuditLog,
) -> None:
    """A step's rows commit with its position, so a step lost in a server crash is applied
    again whole: it need not wait for its WAL to reach disk (13% off a rebuild at 200,000
    events). Every other transaction on the pooled connections, the deliveries' own above
    all, still waits: a webhook is answered only once its delivery is durable."""
    if log.db.dialect == "sqlite":
        pytest.skip("PostgreSQL's asynchronous commit; SQLite commits as its connection is set")
    log.record(sample_deliveries())
    witness = CommitSettingWitness()
    Projector(log, [witness], batch_size=8).run_once()
    assert len(witness.seen) > 1 and set(witness.seen) == {"off"}
    with contextlib.ExitStack() as held:  # every pooled connection at once, the step's included
        for _ in range(4):  # POSTGRES_POOL_SIZE
            cursor = held.enter_context(log.db.transaction())
            cursor.execute("SELECT current_setting('synchronous_commit') AS setting")
            assert cursor.fetchone()["setting"] == "on"


class PickyIndex(EventIndex):
    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        if any(event.delivery.type == "role.created" for event in events):
            raise ValueError("cannot handle roles")
        super().apply(cursor, t, db, events)


def test_a_poison_event_is_reported_counted_and_skipped(log: AuditLog) -> None:
    deliveries = sample_deliveries()
    log.record(deliveries)
    projector = Projector(log, [PickyIndex()], batch_size=8)
    projector.run_once()
    (status,) = projector.status()
    assert status["errors"] == 1 and status["lag"] == 0
    rows = log.db.fetchall(f"SELECT type FROM {active_tables(log.db, 'events')['events']}")
    assert len(rows) == len(deliveries) - 1
    assert "role.created" not in {r["type"] for r in rows}
    errors = log.db.fetchall("SELECT event_id, error FROM " + log.db.table("projection_errors"))
    assert "cannot handle roles" in errors[0]["error"]
    role = next(d for d in deliveries if d.type == "role.created")
    assert errors[0]["event_id"] == role.svix_id  # which delivery, not only where


class OversizedIndex(EventIndex):
    """Writes, for `role.created` only, a value no B-tree entry can hold: PostgreSQL refuses
    it with class 54 (program limit exceeded), which psycopg raises as an OperationalError."""

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        if any(event.delivery.type == "role.created" for event in events):
            cursor.execute("CREATE TEMP TABLE IF NOT EXISTS oversized (value TEXT PRIMARY KEY)")
            cursor.execute(
                "INSERT INTO oversized SELECT string_agg(md5(i::text), '')"
                " FROM generate_series(1, 200) AS i"
            )
        super().apply(cursor, t, db, events)


def test_an_event_the_database_refuses_for_its_data_is_still_a_poison_event(
    log: AuditLog,
) -> None:
    """Not every error psycopg calls operational is the database failing: an index row too
    large is the event's own, would fail every retry, and must not stop the projection."""
    if log.db.dialect != "postgresql":
        pytest.skip("a PostgreSQL error class; SQLite has no limit on an index entry's size")
    deliveries = sample_deliveries()
    log.record(deliveries)
    projector = Projector(log, [OversizedIndex()], batch_size=8)
    projector.run_once()
    (status,) = projector.status()
    assert status["errors"] == 1 and status["lag"] == 0
    errors = log.db.fetchall("SELECT error FROM " + log.db.table("projection_errors"))
    assert "ProgramLimitExceeded" in errors[0]["error"]


class UnindexableBuild(EventIndex):
    """A build whose read indexes cannot be made (as `events` v5's on a store holding an id
    too long for a B-tree entry): its switch fails every time, until `broken` is cleared."""

    broken = True

    def read_indexes(self, t: Tables) -> list[str]:
        if not self.broken:
            return super().read_indexes(t)
        return [f"CREATE INDEX {t.index('unindexable')} ON {t['events']} (no_such_column)"]


def test_a_projection_that_keeps_failing_does_not_stop_the_others(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every round, the failing build is tried before the other projections: before, its error
    ended the round and the read models after it stopped following the store."""
    deliveries = sample_deliveries()
    log.record(deliveries[:10])
    Projector(log).run_once()
    unindexable = UnindexableBuild()
    others = [SessionTimelines(), ObjectsProjection()]
    projector = first = Projector(log, [unindexable, *others], batch_size=8)
    projector.rebuild("events")
    monkeypatch.setattr(runner, "RETRY_FIRST_SECONDS", 0.0)  # due again at once, each time
    log.record(deliveries[10:20])
    with pytest.raises(Exception, match="no_such_column") as failed:
        projector.run_once()
    assert failed.value.__notes__ == ["in projection events, generation 2"]

    def lags() -> dict[str, tuple[str, int, int]]:
        return {r["name"]: (r["state"], r["lag"], r["serving_lag"]) for r in projector.status()}

    assert lags() == {
        "events": ("rebuilding", 0, 0),  # built but not switched; the live one followed
        "timelines": ("live", 0, 0),
        "objects": ("live", 0, 0),
    }
    log.record(deliveries[20:])
    with pytest.raises(Exception, match="no_such_column"):
        projector.run_once()
    assert lags()["objects"] == lags()["timelines"] == ("live", 0, 0)
    # A failure sets it aside for its pause; meanwhile the others go on, and nothing is raised.
    monkeypatch.setattr(runner, "RETRY_FIRST_SECONDS", 3600.0)
    projector = Projector(log, [unindexable, *others], batch_size=8)  # none set aside yet
    with pytest.raises(Exception, match="no_such_column"):
        projector.run_once()
    again = [dataclasses.replace(d, svix_id=f"{d.svix_id}_again") for d in deliveries[:5]]
    log.record(again)
    projector.run_once()
    assert lags()["objects"] == lags()["timelines"] == ("live", 0, 0)
    # While the build is set aside, the live generation serves reads, and follows the store.
    assert lags()["events"] == ("rebuilding", len(again), 0)
    unindexable.broken = False
    Projector(log, [unindexable, *others]).run_once()  # a new process tries it at once
    assert lags()["events"] == ("live", 0, 0)
    assert projector.registration("events").generation == 2
    # This process set that build aside for an hour; switched live since, it follows at once.
    log.record([dataclasses.replace(d, svix_id=f"{d.svix_id}_later") for d in deliveries[:2]])
    projector.run_once()
    assert lags()["events"] == ("live", 0, 0)
    # And the first process forgets the build it set aside: else it would be due for ever, and
    # its follower would catch up without pause.
    assert first.retry_due()
    first.run_once()
    assert not first.retry_due()


class FailingOnce(EventIndex):
    """The next step of generation `fails` fails, once, as a full disk or a lost lock would."""

    fails: int | None = None

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        if t.generation == self.fails:
            self.fails = None
            raise sqlite3.OperationalError("disk I/O error")
        super().apply(cursor, t, db, events)


def test_a_live_generation_failing_beside_a_build_does_not_end_the_others_following(
    log: AuditLog,
) -> None:
    """Beside a build, live generations follow the store until it switches; one of them
    failing took the build's name out of those under way, and the others stopped following
    (found by review): a delivery arriving during the build was left behind."""
    deliveries = sample_deliveries()
    log.record(deliveries[:20])
    failing = FailingOnce()
    projector = Projector(log, [failing, SessionTimelines(), ObjectsProjection()], batch_size=4)
    projector.run_once()
    projector.rebuild("events")
    failing.fails = 1  # the live generation, ahead of the build, is stepped in the first round
    steps: list[int] = []

    def progress(name: str, count: int) -> None:  # told of the build's steps
        steps.append(count)
        if len(steps) == 2:  # the followers have come back short once
            log.record(deliveries[20:21])

    with pytest.raises(StoreUnavailable, match="disk I/O error"):
        projector.catch_up(*projector.projections.values(), progress=progress)
    lags = {row["name"]: (row["state"], row["lag"]) for row in projector.status()}
    assert lags == {"events": ("live", 0), "timelines": ("live", 0), "objects": ("live", 0)}


def test_a_follower_tries_a_set_aside_projection_again_when_its_pause_ends(
    log: AuditLog,
) -> None:
    """Not at the next delivery or recheck, which may be long in coming: the pause is 1 s."""
    deliveries = sample_deliveries()
    log.record(deliveries[:10])
    failing = FailingOnce()
    projector = Projector(log, [failing, SessionTimelines()])
    projector.run_once()
    failing.fails = 1
    with following(projector, recheck_seconds=3600):
        log.record(deliveries[10:11])
        wait_until(
            lambda: all(row["lag"] == 0 for row in projector.status()),
            "the set-aside projection was not tried again",
        )
    assert failing.fails is None  # it did fail, and was tried again


def test_a_busy_sqlite_file_ends_the_round_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's one write lock held elsewhere: each projection's step would wait it out in
    turn (30 s each, and as long again for each build), so the first ends the round, as a
    database that is down does, and nothing is set aside (found by review)."""
    monkeypatch.setattr(storage, "SQLITE_LOCK_TIMEOUT_SECONDS", 1)
    with fresh_log("sqlite", tmp_path, "busy") as log:
        log.record(sample_deliveries()[:3])
        projector = Projector(log)
        assert isinstance(log.database, SqliteDatabase)
        holder = sqlite3.connect(log.database.path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(Exception, match="locked") as raised:
                projector.run_once()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert is_store_down(raised.value)
        assert not hasattr(raised.value, "__notes__")  # raised as it came: none set aside
        projector.run_once()
        assert all(row["lag"] == 0 for row in projector.status())


def test_what_ends_a_round_and_what_sets_one_projection_aside() -> None:
    assert is_store_down(psycopg.OperationalError("connection refused"))  # no SQLSTATE
    # psycopg refusing a parameter, before any server: one statement's, not the database's.
    assert not is_store_down(psycopg.ProgrammingError("only '%s', '%b', '%t' are allowed"))
    assert not is_store_down(psycopg.DataError("text fields cannot contain NUL (0x00) bytes"))
    # Several projections' failures: one line, if each is the database's.
    timeouts = [StoreUnavailable("lock timeout"), StoreUnavailable("lock timeout")]
    timeouts[0].add_note("in projection events, generation 1")
    group = ExceptionGroup("projections failed; the others went on", timeouts)
    assert unavailable_reason(group) == (
        "lock timeout (in projection events, generation 1); lock timeout"
    )
    assert unavailable_reason(ExceptionGroup("x", [*timeouts, ValueError("a bug")])) is None


def test_a_database_failure_mid_step_is_not_a_poison_event(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock timeout (a role's `lock_timeout`, a `pg_dump` or a maintenance job holding the
    table) fails the step, which is tried again: no event is reported and skipped for it."""
    if log.db.dialect != "postgresql":
        pytest.skip("SQLite takes its write lock at BEGIN: no lock can time out inside a step")
    deliveries = sample_deliveries()
    log.record(deliveries)
    Projector(log).run_once()  # the tables exist; the next deliveries wait for the next step
    more = [dataclasses.replace(d, svix_id=f"{d.svix_id}_again") for d in deliveries[:5]]
    log.record(more)
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=200")  # as a DBA might set for a role
    monkeypatch.setattr(runner, "RETRY_FIRST_SECONDS", 0.0)  # a failed step is due again at once
    timed = AuditLog(log.database)
    try:
        projector = Projector(timed)
        table = active_tables(log.db, "events")["events"]
        with log.db.transaction() as holder:
            holder.execute(f"LOCK TABLE {table} IN SHARE MODE")
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                projector.run_once()
            # Only the locked table's projection waits: the others went on.
            lags = {row["name"]: row["lag"] for row in projector.status()}
            assert lags == {"events": len(more), "objects": 0, "timelines": 0}
        projector.run_once()
        errors = log.db.fetchall("SELECT error FROM " + log.db.table("projection_errors"))
        assert errors == []
        indexed = {r["svix_id"] for r in log.db.fetchall(f"SELECT svix_id FROM {table}")}
        assert {d.svix_id for d in [*deliveries, *more]} <= indexed
    finally:
        timed.close()


def test_a_rebuild_in_a_process_per_projection_equals_the_live_generation(log: AuditLog) -> None:
    """`audit rebuild --all` on PostgreSQL: groups of projections catch up in processes."""
    projector = Projector(log)
    log.record(sample_deliveries())
    projector.run_once()
    live = all_rows(log.db, drop=ARRIVAL_COLUMNS)
    assert live["objects"]["changes"] and live["timelines"]["session_events"]
    built = {name: projector.rebuild(name) for name in projector.projections}
    heard: dict[str, int] = {}

    def progress(name: str, count: int) -> None:
        heard[name] = heard.get(name, 0) + count

    split = groups(list(projector.projections.values()), cores=2)
    assert split == [["objects"], ["events", "timelines"]]  # balanced by rebuild_seconds
    catch_up_in_processes(log.database, split, progress)
    assert {name: active_tables(log.db, name).generation for name in built} == built
    assert all(row["lag"] == 0 and row["errors"] == 0 for row in projector.status())
    assert all_rows(log.db, drop=ARRIVAL_COLUMNS) == live
    stored = log.recorder.max_notification_id()
    assert heard == dict.fromkeys(built, stored)  # each process read the whole store


def test_a_failed_process_is_named_and_the_others_still_switch(log: AuditLog) -> None:
    """One group fails; the other's build still goes live, and the failed group's build is
    left as it was, for the next catch-up to finish."""
    projector = Projector(log)
    log.record(sample_deliveries())
    projector.run_once()
    live = all_rows(log.db, drop=ARRIVAL_COLUMNS)
    built = {name: projector.rebuild(name) for name in ("objects", "events")}
    with pytest.raises(CatchUpFailed, match=r"(?s)events,no_such: exited with status 1.*KeyError"):
        catch_up_in_processes(log.database, [["objects"], ["events", "no_such"]])
    assert active_tables(log.db, "objects").generation == built["objects"]
    assert active_tables(log.db, "events").generation != built["events"]
    [events] = [row for row in projector.status() if row["name"] == "events"]
    assert events["state"] == "rebuilding"
    projector.run_once()
    assert active_tables(log.db, "events").generation == built["events"]
    assert all_rows(log.db, drop=ARRIVAL_COLUMNS) == live


def test_a_rebuild_in_processes_interrupted_here_stops_them_and_can_be_finished(
    log: AuditLog,
) -> None:
    """An interrupt (or a failing progress callback) in this process must stop the processes
    at once, not wait on them: with a shared queue nobody read any more, they could not even
    exit once its pipe had filled (about 1,400 messages), and this process waited for ever."""
    deliveries = sample_deliveries()
    log.record([d for i in range(25) for d in renamed(deliveries, f"r{i}")])
    projector = Projector(log)
    projector.run_once()
    live = all_rows(log.db, drop=ARRIVAL_COLUMNS)
    for name in projector.projections:
        projector.rebuild(name)
    raised: list[BaseException] = []

    def interrupted(name: str, count: int) -> None:
        raise KeyboardInterrupt

    def rebuild() -> None:
        try:  # one step a message: several thousand, far more than a pipe holds
            catch_up_in_processes(
                log.database, [["objects"], ["events", "timelines"]], interrupted, batch_size=1
            )
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=rebuild, daemon=True)
    thread.start()
    thread.join(60)  # a guard against hanging, not a timing
    assert not thread.is_alive(), "the interrupted rebuild did not return"
    assert [type(exc) for exc in raised] == [KeyboardInterrupt]
    # What the processes committed stands; the next catch-up finishes the builds.
    projector.run_once()
    assert {row["state"] for row in projector.status()} == {"live"}
    assert all_rows(log.db, drop=ARRIVAL_COLUMNS) == live


def test_a_row_moved_and_moved_back_within_one_batch_is_listed_as_a_rebuild_lists_it(
    database: Database, tmp_path: Path
) -> None:
    """`listed_at` is the position that last moved a row into its owner's lists. A session's
    user going A, B, then A again within one live batch kept its first listing, while a
    rebuild (or batches of one) listed it again at the move back (review D; SPEC 5: rebuilt
    and followed live alike). Clerk moves no session, but a signed payload may."""
    kind = "sqlite" if isinstance(database, SqliteDatabase) else "postgresql"

    def session(user_id: str, second: int) -> Delivery:
        body = payload("session.created")
        body["data"].update(id="sess_movedBack", user_id=user_id, updated_at=second * 1000)
        return parse_delivery(
            json.dumps(body).encode(),
            svix_id=f"msg_moved{second}",
            svix_timestamp=1,
            received_at=second,
        )

    moves = [session("user_movedA", 1), session("user_movedB", 2), session("user_movedA", 3)]
    listed = []
    for batches in ([moves[:1], moves[1:]], [moves[:1], moves[1:2], moves[2:]], [moves]):
        with fresh_log(kind, tmp_path, "moved") as log:
            projector = Projector(log)
            for batch in batches:
                log.record(batch)
                projector.run_once()
            sessions = active_tables(log.db, "objects")["sessions"]
            [row] = log.db.fetchall(f"SELECT user_id, listed_at, position FROM {sessions}")
            listed.append((row["user_id"], row["listed_at"] == row["position"]))
    assert listed == [("user_movedA", True)] * 3
