"""The event store itself: immutability, concurrency, outages; on both backends."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient

from audit.aggregates.routing import stream_id
from audit.application import AuditLog
from audit.projections.runner import MARKER_TOPIC
from audit.storage import StoreUnavailable, is_statement_refused
from tests.test_projections import sample_deliveries
from tests.webhook_helpers import new_svix_id, payload, post


def test_events_table_refuses_update_and_delete(client: TestClient, log: AuditLog, secret) -> None:
    assert post(client, secret, payload("user.created")).status_code == 200
    table = log.db.table(log.db.events_table)
    for statement in (f"UPDATE {table} SET topic = 'x'", f"DELETE FROM {table}"):
        with pytest.raises(Exception, match="immutable"), log.db.transaction() as cursor:
            cursor.execute(statement)
    assert log.recorder.max_notification_id() == 2  # the event and its delivery marker


def test_same_delivery_from_8_threads_records_once(
    client: TestClient, log: AuditLog, secret
) -> None:
    raw = json.dumps(payload("user.updated")).encode()
    barrier = threading.Barrier(8)

    def send(_: int):
        barrier.wait()
        return post(client, secret, raw, svix_id="msg_race")

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    statuses = sorted(r.json()["status"] for r in responses)
    assert statuses == ["duplicate"] * 7 + ["recorded"]
    assert len({r.json()["position"] for r in responses}) == 1
    user = payload("user.updated")["data"]["id"]
    assert [e.svix_id for e in log.stream_events(stream_id("user", user))] == ["msg_race"]


def test_racing_copies_across_separate_stores_record_once(database, log: AuditLog) -> None:
    """Two processes' worth of connections (two AuditLog instances) racing one svix-id."""
    other = AuditLog(database)
    try:
        from audit.aggregates.delivery import parse_delivery

        raw = json.dumps(payload("user.created")).encode()
        delivery = parse_delivery(raw, svix_id="msg_two", svix_timestamp=1, received_at=1)
        barrier = threading.Barrier(2)

        def record(target: AuditLog):
            barrier.wait()
            return target.record([delivery])[0]

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(record, [log, other]))
        assert sorted(o.status for o in outcomes) == ["duplicate", "recorded"]
        user = payload("user.created")["data"]["id"]
        assert len(log.stream_events(stream_id("user", user))) == 1
    finally:
        other.close()


def test_copies_of_a_recorded_body_are_duplicates_behind_a_conflicting_one(log: AuditLog) -> None:
    """Copies of one svix-id in one group commit were answered by the first copy's body: behind
    a copy with another body (409), those with the recorded body got 409 too (found by review:
    16 racing posts of each)."""
    from audit.aggregates.delivery import parse_delivery

    def copy(body: dict) -> object:
        raw = json.dumps(body).encode()
        return parse_delivery(raw, svix_id="msg_one", svix_timestamp=1, received_at=1)

    recorded, other = payload("user.created"), payload("user.updated")
    [first] = log.record([copy(recorded)])
    outcomes = log.record([copy(other), copy(recorded), copy(other), copy(recorded)])
    assert [o.status for o in outcomes] == ["conflict", "duplicate", "conflict", "duplicate"]
    assert {o.position for o in outcomes if o.status == "duplicate"} == {first.position}


def test_8_different_deliveries_to_one_user_all_record(database, log: AuditLog) -> None:
    """Separate AuditLog instances (no shared version cache) force real version conflicts."""
    from audit.aggregates.delivery import parse_delivery

    logs = [log] + [AuditLog(database) for _ in range(3)]
    try:
        body = payload("session.created")
        barrier = threading.Barrier(8)

        def record(index: int):
            envelope = json.loads(json.dumps(body))
            envelope["data"]["id"] = f"sess_{index}"
            raw = json.dumps(envelope).encode()
            delivery = parse_delivery(raw, svix_id=f"msg_{index}", svix_timestamp=1, received_at=1)
            barrier.wait()
            return logs[index % len(logs)].record([delivery])[0]

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(record, range(8)))
        assert [o.status for o in outcomes] == ["recorded"] * 8
        user = body["data"]["user_id"]
        stored = log.stream_events(stream_id("user", user))
        assert sorted(e.svix_id for e in stored) == sorted(f"msg_{i}" for i in range(8))
        assert [e.originator_version for e in stored] == list(range(1, 9))
    finally:
        for other in logs[1:]:
            other.close()


def test_8_concurrent_http_deliveries_to_one_user(
    client: TestClient, log: AuditLog, secret
) -> None:
    body = payload("session.created")
    barrier = threading.Barrier(8)

    def send(index: int):
        envelope = json.loads(json.dumps(body))
        envelope["data"]["id"] = f"sess_http_{index}"
        barrier.wait()
        return post(client, secret, envelope, svix_id=new_svix_id())

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    assert [r.json()["status"] for r in responses] == ["recorded"] * 8
    stored = log.stream_events(stream_id("user", body["data"]["user_id"]))
    assert len(stored) == 8


def test_payload_reads_return_what_a_plain_read_returns(
    client: TestClient, log: AuditLog, secret
) -> None:
    """`fetch_payloads` (binary rows on PostgreSQL) and a plain read agree on every value,
    for a body with non-ASCII text and an escaped NUL, and on what decodes from the payload."""
    body = payload("user.updated")
    body["data"]["first_name"] = "Zoë \u0000 \u65e5\u672c"
    assert post(client, secret, body).status_code == 200
    db = log.db
    statement = (
        f"SELECT {db.position_column} AS position, topic, originator_id, originator_version,"
        f" state FROM {db.table(db.events_table)} ORDER BY {db.position_column}"
    )
    with db.reader() as cursor:
        binary = [dict(row) for row in db.fetch_payloads(cursor, statement, [])]
        cursor.execute(statement)
        plain = [dict(row) for row in cursor.fetchall()]
    assert binary == plain
    assert len(binary) == 2  # the delivery and its marker
    assert all(isinstance(row["state"], bytes) for row in binary)
    delivery = next(log.stored_delivery(row) for row in binary if row["topic"] != MARKER_TOPIC)
    assert delivery.data["first_name"] == "Zoë \u0000 \u65e5\u672c"


def unprotected(log: AuditLog) -> None:
    """What someone who owns the database can do: take the events table's triggers away."""
    table = log.db.table(log.db.events_table)
    if log.db.dialect == "sqlite":
        statements = ["DROP TRIGGER events_refuse_update", "DROP TRIGGER events_refuse_delete"]
    else:
        statements = [f"ALTER TABLE {table} DISABLE TRIGGER events_refuse_change"]
    with log.db.transaction() as cursor:
        for statement in statements:
            cursor.execute(statement)


def test_opening_the_store_puts_back_what_keeps_events_immutable(log: AuditLog) -> None:
    """Opening writes nothing when the events table's triggers are in place (10fb69c), but a
    trigger dropped, or disabled on PostgreSQL, is put back by the next open, as re-creating
    them on every start did (review F)."""
    log.record(sample_deliveries()[:1])
    table = log.db.table(log.db.events_table)
    unprotected(log)
    assert not log.db._events_protected()
    AuditLog(log.database).close()  # a process starting on the store
    assert log.db._events_protected()
    with pytest.raises(Exception, match="immutable"), log.db.transaction() as cursor:
        cursor.execute(f"UPDATE {table} SET topic = 'x'")


def test_a_statement_past_the_databases_limits_is_a_fault_not_an_outage(log: AuditLog) -> None:
    """A statement the database refuses for itself fails again alike: raised as it came (a
    500, logged with its traceback), never as the store unavailable (a 503 with Retry-After,
    which a client retries for ever). A missing table still reads as unavailable on SQLite:
    a generation switched away under a read, looked up again."""
    db = log.db
    if db.dialect == "sqlite":  # past SQLite's expression depth of 1,000
        statement = f"SELECT {' OR '.join(['1 = %s'] * 2000)}"
    else:  # past PostgreSQL's 100 arguments of a function (54023)
        statement = f"SELECT concat({', '.join(['%s'] * 101)})"
    with pytest.raises(Exception) as raised:
        db.fetchone(statement, [1] * statement.count("%s"))
    assert not isinstance(raised.value, StoreUnavailable)
    assert is_statement_refused(raised.value)
    assert db.fetchone("SELECT 1 AS one")["one"] == 1  # the connection is still good

    if db.dialect == "sqlite":
        with pytest.raises(StoreUnavailable, match="no such table"):
            db.fetchone("SELECT 1 FROM no_such_table")
