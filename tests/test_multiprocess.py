"""Issue 7, quick versions: several real processes on one store, killed with SIGKILL mid-load,
fed by a Svix-like sender; nothing lost, nothing twice, projections equal a fresh rebuild."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from audit.application import AuditLog
from audit.config import SqliteDatabase
from tests.conftest import API_TOKEN, drop_postgres_schema, new_postgres_database, new_secret
from tests.soak.scenario import (
    Processes,
    check_store,
    messages,
    mismatched_rows_after_rebuild,
    processes,
    wait_for_no_lag,
)
from tests.soak.sender import Report, SvixLikeSender

DELIVERIES = 600


def send_in_background(sender: SvixLikeSender, count: int) -> tuple[threading.Thread, list]:
    result: list[Report] = []
    thread = threading.Thread(target=lambda: result.append(sender.send_all(messages(count))))
    thread.start()
    return thread, result


def wait_until(attempts: int) -> None:
    """Until the sender has made this many delivery attempts (or a minute has gone)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and CountingSender.progress < attempts:
        time.sleep(0.02)


def env_for(url: str, secret: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "CLERK_"))}
    env.update(
        AUDIT_DATABASE_URL=url, CLERK_WEBHOOK_SIGNING_SECRET=secret, AUDIT_API_TOKENS=API_TOKEN
    )
    return env


def assert_end_state(log: AuditLog, report: Report, running: Processes) -> None:
    print(report.summary(), check_store(log, report.acknowledged).summary(), dict(running.kills))
    assert not report.gave_up, report.summary()
    server_errors = {s: n for s, n in report.statuses.items() if s.startswith("5") and s != "503"}
    assert not server_errors, report.summary()
    store = check_store(log, report.acknowledged)
    assert store.ok and store.unacknowledged == 0, store.summary()
    assert len(report.acknowledged) == DELIVERIES
    assert wait_for_no_lag(log, timeout=30) is not None
    running.stop_all()
    assert mismatched_rows_after_rebuild(log) == 0


class CountingSender(SvixLikeSender):
    progress = 0

    def _attempts(self, message, index, report):  # type: ignore[no-untyped-def]
        CountingSender.progress += 1
        return super()._attempts(message, index, report)


@pytest.mark.postgres
def test_two_workers_and_a_projector_killed_mid_load_on_postgres() -> None:
    database = new_postgres_database()
    secret = new_secret()
    url = (
        f"postgresql://{database.user}@{database.host}:{database.port}/{database.dbname}"
        f"?schema={database.schema}"
    )
    log = AuditLog(database)
    try:
        with processes(env_for(url, secret)) as running:
            # The only projector is the one `audit serve` runs: killed, it must come back.
            endpoint = running.serve("api", workers=2)
            CountingSender.progress = 0
            sender = CountingSender([endpoint], secret, concurrency=8, seed=1)
            thread, holder = send_in_background(sender, DELIVERIES)
            for at, action in ((100, "projector"), (250, "worker"), (400, "projector")):
                wait_until(at)
                if action == "worker":
                    assert running.kill_one_worker("api")
                else:
                    assert running.kill_projector_child("api")
            thread.join(timeout=180)
            assert holder, "the sender did not finish"
            assert running.kills["projector"] == 2 and running.kills["api-worker"] == 1
            assert_end_state(log, holder[0], running)
    finally:
        log.close()
        drop_postgres_schema(database)


def test_two_servers_on_one_sqlite_file(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "shared.db")
    secret = new_secret()
    log = AuditLog(database)
    try:
        with processes(env_for(f"sqlite:///{database.path}", secret)) as running:
            endpoints = [running.serve("api-a"), running.serve("api-b")]
            CountingSender.progress = 0
            sender = CountingSender(endpoints, secret, concurrency=8, seed=2)
            thread, holder = send_in_background(sender, DELIVERIES)
            wait_until(300)
            running.kill9("api-b")
            thread.join(timeout=180)
            assert holder, "the sender did not finish"
            assert_end_state(log, holder[0], running)
    finally:
        log.close()
