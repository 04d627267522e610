"""`audit verify`: a store as recorded passes; each way of changing it behind the triggers'
back is reported, on both backends."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from starlette.testclient import TestClient

from audit.application import AuditLog
from audit.integrity import Seal, verify_store
from audit.projections.runner import MARKER_TOPIC
from tests.conftest import drop_postgres_schema, new_postgres_database, new_secret
from tests.tcp_proxy import TcpProxy
from tests.test_cli import AUDIT, base_env, many_users, run_audit, url_of
from tests.test_projections import sample_deliveries, wait_until
from tests.test_store import unprotected
from tests.webhook_helpers import payload_files, post


def stored_rows(log: AuditLog) -> list[Any]:
    db = log.db
    return db.fetchall(
        f"SELECT {db.position_column} AS position, originator_id, originator_version, topic,"
        f" state FROM {db.table(db.events_table)} ORDER BY {db.position_column}",
        payloads=True,
    )


def deliveries(log: AuditLog) -> list[Any]:
    return [row for row in stored_rows(log) if row["topic"] != MARKER_TOPIC]


def rewrite(log: AuditLog, row: Any, change: Callable[[dict[str, Any]], None]) -> None:
    """Change one stored event's recorded fields in place."""
    state = json.loads(bytes(row["state"]))
    change(state)
    replace_state(log, row, json.dumps(state).encode())


def replace_state(log: AuditLog, row: Any, state: bytes) -> None:
    db = log.db
    with db.transaction() as cursor:
        cursor.execute(
            db.sql(
                f"UPDATE {db.table(db.events_table)} SET state = %s WHERE {db.position_column} = %s"
            ),
            [state, row["position"]],
        )


def delete(log: AuditLog, row: Any) -> None:
    db = log.db
    with db.transaction() as cursor:
        cursor.execute(
            db.sql(f"DELETE FROM {db.table(db.events_table)} WHERE {db.position_column} = %s"),
            [row["position"]],
        )


def middle_of_a_stream(log: AuditLog) -> Any:
    """A delivery with later ones in its stream: deleting it leaves a gap."""
    rows = deliveries(log)
    third = {row["originator_id"] for row in rows if row["originator_version"] == 3}
    return next(r for r in rows if r["originator_version"] == 2 and r["originator_id"] in third)


def test_a_store_as_recorded_passes(log: AuditLog) -> None:
    recorded = sample_deliveries()
    log.record(recorded)
    log.record(recorded[:3])  # redeliveries store nothing more
    report = verify_store(log, batch_size=7)  # batches that split deliveries from markers
    assert report.ok, report.problems
    assert (report.events, report.deliveries, report.markers) == (
        2 * len(recorded),
        len(recorded),
        len(recorded),
    )
    assert 0 < report.streams < len(recorded)
    assert report.streams == len({row["originator_id"] for row in deliveries(log)})


def edit_body(state: dict[str, Any]) -> None:
    state["body"] = state["body"].replace('"type"', ' "type"', 1)  # the same JSON, other bytes


def edit_body_and_digest(state: dict[str, Any]) -> None:
    edit_body(state)
    state["sha256"] = hashlib.sha256(state["body"].encode()).hexdigest()


def edit_type(state: dict[str, Any]) -> None:
    state["type"] = "user.deleted" if state["type"] != "user.deleted" else "user.updated"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (edit_body, "its body does not have the SHA-256 recorded with it"),
        (edit_body_and_digest, "has another SHA-256 than its marker"),
        (edit_type, "its stored type is not what its body says"),
    ],
)
def test_a_delivery_changed_in_place_is_reported(
    log: AuditLog, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    log.record(sample_deliveries())
    unprotected(log)
    target = deliveries(log)[5]
    rewrite(log, target, change)
    report = verify_store(log)
    assert report.problem_count == 1, report.problems
    [problem] = report.problems
    assert expected in problem
    assert f"position {target['position']}" in problem


def test_an_event_deleted_from_a_stream_is_reported(log: AuditLog) -> None:
    log.record(sample_deliveries())
    unprotected(log)
    target = middle_of_a_stream(log)
    delete(log, target)
    report = verify_store(log)
    assert report.problem_count == 2, report.problems
    gap = next(p for p in report.problems if p.startswith("stream "))
    assert "1 missing" in gap
    orphan = next(p for p in report.problems if "holds no delivery" in p)
    assert f"version {target['originator_version']}," in orphan


def test_a_marker_deleted_is_reported(log: AuditLog) -> None:
    log.record(sample_deliveries())
    unprotected(log)
    marker = next(row for row in stored_rows(log) if row["topic"] == MARKER_TOPIC)
    delete(log, marker)
    report = verify_store(log)
    assert report.problem_count == 1, report.problems
    assert report.problems[0].endswith("has no marker")


def test_audit_verify_says_ok_or_lists_what_it_found(tmp_path, log: AuditLog) -> None:
    log.record(sample_deliveries())
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    passed = run_audit("verify", env=env)
    assert passed.returncode == 0, passed.stderr
    count = len(sample_deliveries())
    assert passed.stdout.startswith(f"read {2 * count} stored events: {count} deliveries,")
    assert passed.stdout.splitlines()[-2].startswith("ok: ")
    assert passed.stdout.splitlines()[-1] == f"seal: {verify_store(log).seal}"
    with_secret = run_audit("verify", env={**env, "CLERK_WEBHOOK_SIGNING_SECRET": new_secret()})
    assert with_secret.returncode == 0, with_secret.stderr
    assert with_secret.stdout.splitlines()[1] == (
        f"signatures: 0 made by a configured signing secret; {count} without one, recorded"
        " before signatures were kept"
    )
    unprotected(log)
    rewrite(log, deliveries(log)[0], edit_body)
    failed = run_audit("verify", env=env)
    assert failed.returncode == 1
    lines = failed.stdout.splitlines()
    assert lines[1] == "signatures not checked: CLERK_WEBHOOK_SIGNING_SECRET is not set"
    assert "its body does not have the SHA-256 recorded with it" in lines[2]
    assert lines[-2] == "1 problem: the store is not as it was recorded"
    assert lines[-1].startswith("seal: ")


def test_a_record_that_cannot_be_read_is_reported_and_the_walk_goes_on(log: AuditLog) -> None:
    log.record(sample_deliveries())
    unprotected(log)
    target = deliveries(log)[2]
    replace_state(log, target, b"not json")
    report = verify_store(log)
    assert report.deliveries == len(sample_deliveries()) - 1  # the rest were all read
    assert report.problem_count == 2, report.problems
    assert report.problems[0].startswith(f"position {target['position']}: cannot be read (")
    assert report.problems[1].endswith("which holds no delivery")  # its marker, left alone


def test_a_marker_moved_to_another_svix_id_is_reported(log: AuditLog) -> None:
    log.record(sample_deliveries())
    unprotected(log)
    marker = next(row for row in stored_rows(log) if row["topic"] == MARKER_TOPIC)
    rewrite(log, marker, lambda state: state.update(svix_id="msg_other"))
    report = verify_store(log)
    assert report.problems == [
        f"position {marker['position']}: the marker of msg_other is on another id",
        f"position {marker['position']}: the marker of msg_other names the delivery at position"
        f" {marker['position'] - 1}, which is msg_s0",
    ]


def test_an_event_of_another_class_is_reported(log: AuditLog) -> None:
    log.record(sample_deliveries())
    unprotected(log)
    target = deliveries(log)[1]
    db = log.db
    with db.transaction() as cursor:
        cursor.execute(
            db.sql(
                f"UPDATE {db.table(db.events_table)} SET topic = %s WHERE {db.position_column} = %s"
            ),
            ["eventsourcing.domain:AggregateEvent", target["position"]],
        )
    report = verify_store(log)
    assert report.problem_count == 2, report.problems
    assert report.problems[0] == (
        f"position {target['position']}: an event of unexpected type"
        " eventsourcing.domain:AggregateEvent"
    )
    assert report.problems[1].endswith("which holds no delivery")


def post_samples(client: TestClient, secret: str) -> int:
    files = payload_files()
    for i, path in enumerate(files):
        header_set = "webhook" if i % 2 else "svix"  # either set's signature is kept
        response = post(client, secret, path.read_bytes(), header_set=header_set)
        assert response.status_code == 200, response.text
    return len(files)


def test_signatures_kept_on_receipt_verify_with_the_secret_that_made_them(
    client: TestClient, secret: str, log: AuditLog
) -> None:
    count = post_samples(client, secret)
    report = verify_store(log, secrets=[secret])
    assert report.ok, report.problems
    assert (report.signatures_checked, report.signed, report.unsigned) == (True, count, 0)
    rotated = verify_store(log, secrets=[new_secret(), secret])  # any of several, as on receipt
    assert (rotated.ok, rotated.signed) == (True, count)
    other = verify_store(log, secrets=[new_secret()])
    assert other.problem_count == count
    assert all("no signing secret given makes its stored signature" in p for p in other.problems)
    unchecked = verify_store(log)
    assert (unchecked.ok, unchecked.signatures_checked, unchecked.signed) == (True, False, 0)


def test_only_the_signature_finds_a_rewrite_that_kept_every_digest(
    client: TestClient, secret: str, log: AuditLog
) -> None:
    post_samples(client, secret)
    unprotected(log)
    rows = stored_rows(log)
    index = next(i for i, row in enumerate(rows) if row["topic"] != MARKER_TOPIC)
    delivery, marker = rows[index], rows[index + 1]
    assert marker["topic"] == MARKER_TOPIC
    rewrite(log, delivery, edit_body_and_digest)
    digest = json.loads(bytes(stored_rows(log)[index]["state"]))["sha256"]
    rewrite(log, marker, lambda state: state.update(sha256=digest))
    assert verify_store(log).ok  # consistent: nothing else can tell
    report = verify_store(log, secrets=[secret])
    assert report.problem_count == 1, report.problems
    assert report.problems[0].startswith(f"position {delivery['position']}: ")
    assert "no signing secret given makes its stored signature" in report.problems[0]


def test_deliveries_recorded_without_a_signature_are_counted_not_reported(log: AuditLog) -> None:
    log.record(sample_deliveries())
    report = verify_store(log, secrets=[new_secret()])
    assert report.ok, report.problems
    assert (report.signed, report.unsigned) == (0, len(sample_deliveries()))


def test_a_damaged_body_is_a_digest_that_does_not_match(log: AuditLog) -> None:
    """One byte changed so that the body is no JSON: reported, and the walk goes on."""
    log.record(sample_deliveries())
    unprotected(log)
    target = deliveries(log)[3]
    rewrite(log, target, lambda state: state.update(body=state["body"].replace('"', "'", 1)))
    report = verify_store(log)
    assert report.problem_count == 1, report.problems
    assert report.problems[0].startswith(f"position {target['position']}: delivery ")
    assert report.problems[0].endswith("its body does not have the SHA-256 recorded with it")
    assert report.deliveries == len(sample_deliveries())


def with_timestamp(timestamp: int, occurred_at: int) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        envelope = json.loads(state["body"])
        envelope["timestamp"] = timestamp
        state["body"] = json.dumps(envelope)
        state["sha256"] = hashlib.sha256(state["body"].encode()).hexdigest()
        state["occurred_at"] = occurred_at

    return change


def test_fields_are_read_from_the_body_as_the_release_that_stored_it_read_them(
    log: AuditLog,
) -> None:
    """A release before 4fe3e4d kept a whole timestamp as it was, even past year 9999, which
    today's reading (`epoch_ms`) turns into None: that is no change to the store. A stored
    time the body does not say either way is."""
    log.record(sample_deliveries())
    unprotected(log)
    rows = stored_rows(log)
    index = next(i for i, row in enumerate(rows) if row["topic"] != MARKER_TOPIC)
    delivery, marker = rows[index], rows[index + 1]
    far = 10**15  # year 33658
    rewrite(log, delivery, with_timestamp(far, occurred_at=far))
    digest = json.loads(bytes(stored_rows(log)[index]["state"]))["sha256"]
    rewrite(log, marker, lambda state: state.update(sha256=digest))
    assert verify_store(log).ok
    rewrite(log, stored_rows(log)[index], lambda state: state.update(occurred_at=far - 1))
    report = verify_store(log)
    assert report.problem_count == 1, report.problems
    assert report.problems[0].endswith("its stored occurred_at is not what its body says")


def test_a_signature_taken_away_after_signatures_were_kept_is_reported(
    client: TestClient, secret: str, log: AuditLog
) -> None:
    """Without its signature header a rewritten delivery would pass as an older release's."""
    log.record(sample_deliveries()[:2])  # an older release's: none kept
    post_samples(client, secret)
    unprotected(log)
    target = deliveries(log)[-1]
    rewrite(log, target, lambda state: state.update(signature=None))
    for secrets in ([], [secret]):
        report = verify_store(log, secrets=secrets)
        assert report.problem_count == 1, report.problems
        assert report.problems[0].startswith(f"position {target['position']}: delivery ")
        assert "it has no signature, though the delivery at position" in report.problems[0]
        assert report.unsigned == 2


@pytest.mark.postgres
def test_losing_the_database_mid_walk_is_one_line_and_not_a_finding(tmp_path) -> None:
    """Exit 1 says the store was checked and found changed; a lost connection is neither."""
    database = new_postgres_database()
    proxy = TcpProxy(database.host, database.port)
    proxy.start()
    log = AuditLog(database)
    try:
        log.record(many_users(20_000))  # 40 batches: the walk takes a second or so
        env = {**base_env(tmp_path)}
        env["AUDIT_DATABASE_URL"] = url_of(replace(database, host="127.0.0.1", port=proxy.port))
        verify = subprocess.Popen(
            [*AUDIT, "verify"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        walking = (
            "SELECT COUNT(*) AS n FROM pg_stat_activity"
            " WHERE query LIKE 'SELECT notification_id AS position, originator_id%%LIMIT%%'"
        )
        # Until its first batch has been read (or it has ended, which the exit status shows).
        wait_until(
            lambda: verify.poll() is not None or log.db.fetchone(walking)["n"] > 0,
            "audit verify never read a batch",
        )
        proxy.stop()
        out, err = verify.communicate(timeout=60)
    finally:
        log.close()
        proxy.stop()
        drop_postgres_schema(database)
    assert verify.returncode == 2, out + err
    assert out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("audit verify: the database could not be used: ")


def delivery_and_marker(log: AuditLog, pick: Callable[[list[Any]], Any]) -> list[Any]:
    """A delivery `pick` chooses among the stored ones, and its marker (stored right after it)."""
    rows = stored_rows(log)
    delivery = pick(deliveries(log))
    marker = rows[rows.index(delivery) + 1]
    assert marker["topic"] == MARKER_TOPIC
    return [delivery, marker]


def last_of_a_stream(rows: list[Any]) -> Any:
    """The last delivery of a stream with several, not the store's last: deleting it with its
    marker leaves every other check satisfied."""
    last = {row["originator_id"]: row for row in rows}
    return next(
        r
        for r in reversed(rows[:-1])
        if r["originator_version"] > 1 and last[r["originator_id"]] is r
    )


def test_a_seal_holds_while_the_store_only_grows(log: AuditLog) -> None:
    recorded = sample_deliveries()
    log.record(recorded[:10])
    first = verify_store(log, batch_size=3)
    assert first.seal is not None
    assert first.seal.position == stored_rows(log)[-1]["position"]
    assert verify_store(log).seal == first.seal  # batches do not change it
    log.record(recorded[10:])
    later = verify_store(log, seals=[first.seal])
    assert later.ok, later.problems
    assert later.seals_held == [first.seal]
    assert later.seal is not None and later.seal.position > first.seal.position
    assert later.seal.sha256 != first.seal.sha256


def test_only_a_seal_finds_a_streams_last_event_removed_with_its_marker(log: AuditLog) -> None:
    log.record(sample_deliveries())
    seal = verify_store(log).seal
    assert seal is not None
    unprotected(log)
    for row in delivery_and_marker(log, last_of_a_stream):
        delete(log, row)
    assert verify_store(log).ok  # what the other checks cannot see
    report = verify_store(log, seals=[seal])
    assert report.problems == [] and not report.ok
    assert report.seals_broken == [
        f"seal {seal.position}: the stored events up to position {seal.position} are not those"
        " it sealed: one was changed, removed or added, or the seal is not this store's"
    ]
    assert report.seals_held == []


def test_a_seal_finds_the_stores_last_events_removed(log: AuditLog) -> None:
    log.record(sample_deliveries())
    seal = verify_store(log).seal
    assert seal is not None
    unprotected(log)
    removed = delivery_and_marker(log, lambda rows: rows[-1])
    for row in removed:
        delete(log, row)
    report = verify_store(log, seals=[seal])
    assert report.problem_count == 0, report.problems
    [broken] = report.seals_broken
    assert f"(no event is stored at position {seal.position}, the last it sealed)" in broken


def test_a_seal_covers_its_position_and_no_further(log: AuditLog) -> None:
    """A change after a seal's position is not the seal's to find (the other checks find
    this one); at or before it, it is."""
    log.record(sample_deliveries()[:6])
    seal = verify_store(log).seal
    assert seal is not None
    log.record(sample_deliveries()[6:])
    unprotected(log)
    after = deliveries(log)[6]
    rewrite(log, after, edit_body)
    report = verify_store(log, seals=[seal])
    assert report.seals_held == [seal]
    assert report.problem_count == 1 and "SHA-256" in report.problems[0]
    at = next(row for row in stored_rows(log) if row["position"] == seal.position)
    # The same record, its bytes as long and in another order.
    state = json.loads(bytes(at["state"]))
    reordered = json.dumps(dict(reversed(state.items())), separators=(",", ":")).encode()
    assert len(reordered) == len(bytes(at["state"])) and reordered != bytes(at["state"])
    replace_state(log, at, reordered)
    assert verify_store(log).problem_count == 1  # the other checks read it as it was
    [broken] = verify_store(log, seals=[seal]).seals_broken
    assert broken.startswith(f"seal {seal.position}: ")


def test_audit_verify_checks_the_seals_it_is_given(tmp_path, log: AuditLog) -> None:
    log.record(sample_deliveries())
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    first = run_audit("verify", env=env)
    assert first.returncode == 0, first.stderr
    sealed = first.stdout.splitlines()[-1].removeprefix("seal: ")
    position = Seal.parse(sealed).position
    held = run_audit("verify", "--sealed", sealed, env=env)
    assert held.returncode == 0, held.stderr
    assert f"seal {position} holds: the stored events up to it are those it sealed" in (
        held.stdout.splitlines()
    )
    unprotected(log)
    for row in delivery_and_marker(log, last_of_a_stream):
        delete(log, row)
    broken = run_audit("verify", "--sealed", sealed, env=env)
    assert broken.returncode == 1
    assert f"seal {position}: the stored events up to position {position} are not" in (
        broken.stdout
    )
    for bad in ("12", "x:" + "0" * 64, "3:" + "g" * 64, "3:abc"):
        refused = run_audit("verify", "--sealed", bad, env=env)
        assert refused.returncode == 2
        assert refused.stdout == ""
        assert refused.stderr.startswith("audit verify: --sealed: not a seal (POSITION:SHA256")


def set_columns(log: AuditLog, row: Any, **columns: Any) -> None:
    """Change one stored record's columns in place (behind the triggers' back)."""
    db = log.db
    sets = ", ".join(f"{name} = %s" for name in columns)
    with db.transaction() as cursor:
        cursor.execute(
            db.sql(
                f"UPDATE {db.table(db.events_table)} SET {sets} WHERE {db.position_column} = %s"
            ),
            [*columns.values(), row["position"]],
        )


def test_a_record_without_its_bytes_is_a_problem_and_changes_the_seal(log: AuditLog) -> None:
    log.record(sample_deliveries()[:3])
    seal = verify_store(log).seal
    unprotected(log)
    target = deliveries(log)[1]
    set_columns(log, target, state=None)
    report = verify_store(log, seals=[seal])  # the walk goes on to the end
    assert report.problems[0].startswith(f"position {target['position']}: cannot be read (")
    assert report.seal is not None and report.seal != seal
    assert len(report.seals_broken) == 1 and report.seals_held == []


def test_no_record_can_pass_for_two(log: AuditLog) -> None:
    """Every column is framed by its length: a record whose class name carried the next
    record's columns, with that record's bytes, does not hash as the two did."""
    log.record(sample_deliveries()[:4])
    seal = verify_store(log).seal
    *_, first, second = stored_rows(log)
    state = bytes(first["state"])
    topic = (
        f"{first['topic']} {len(state)}\n{state.decode()}{second['position']}"
        f" {second['originator_id']} {second['originator_version']} {second['topic']}"
    )
    unprotected(log)
    delete(log, second)
    set_columns(log, first, topic=topic, state=bytes(second["state"]))
    report = verify_store(log, seals=[seal])
    assert report.seals_held == []
    assert len(report.seals_broken) == 1


def test_a_stream_id_stored_in_another_form_breaks_the_seal(log: AuditLog) -> None:
    """Readers find a stream by its id as stored: in capitals, SQLite's text is another stream."""
    if log.db.dialect != "sqlite":
        pytest.skip("PostgreSQL stores stream ids as uuid: there is no other form to store")
    log.record(sample_deliveries())
    seal = verify_store(log).seal
    unprotected(log)
    stream = deliveries(log)[-1]["originator_id"]
    with log.db.transaction() as cursor:
        cursor.execute(
            f"UPDATE {log.db.events_table} SET originator_id = upper(originator_id)"
            " WHERE originator_id = ?",
            [stream],
        )
    report = verify_store(log, seals=[seal])
    assert report.seals_held == [] and len(report.seals_broken) == 1


def test_a_seal_holds_at_its_own_position_only(log: AuditLog) -> None:
    log.record(sample_deliveries()[:3])
    seal = verify_store(log).seal
    assert seal is not None
    later = Seal(seal.position + 100, seal.sha256)  # a position mistyped
    report = verify_store(log, seals=[seal, later])
    assert report.seals_held == [seal]
    assert report.seals_broken == [
        f"seal {later.position}: the stored events up to position {later.position} are not"
        f" those it sealed (no event is stored at position {later.position}, the last it"
        " sealed): one was changed, removed or added, or the seal is not this store's"
    ]


def test_seal_text_is_ascii_digits_and_64_hex_digits() -> None:
    digest = "ab" * 32
    assert Seal.parse(f"seal: 12:{digest.upper()}") == Seal(12, digest)  # the line, copied
    assert Seal.parse(f" 0:{digest} ") == Seal(0, digest)
    for text in (f"\u00b2:{digest}", f"\u0664:{digest}", f"012:{digest}", f"-1:{digest}"):
        with pytest.raises(ValueError, match="not a seal"):
            Seal.parse(text)


def test_a_broken_seal_is_printed_however_many_problems_come_first(tmp_path, log: AuditLog) -> None:
    log.record(many_users(60))
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    sealed = run_audit("verify", env=env).stdout.splitlines()[-1]
    position = Seal.parse(sealed).position
    mistyped = run_audit("verify", "--sealed", f"{position}:{'0' * 64}", env=env)
    assert mistyped.returncode == 1
    assert mistyped.stdout.splitlines()[-2] == (
        "1 problem: the store is not as it was sealed, or a seal given is not this store's"
    )
    unprotected(log)
    for row in stored_rows(log)[:110]:
        set_columns(log, row, topic="audit.nothing:Here")
    broken = run_audit("verify", "--sealed", sealed, env=env)
    assert broken.returncode == 1
    lines = broken.stdout.splitlines()
    assert any(line.startswith(f"seal {position}: the stored events up to") for line in lines)
    assert any(line.startswith("... and ") for line in lines)  # the problems were cut short
