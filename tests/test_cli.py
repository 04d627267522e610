"""The command line, run as users run it: real processes, real HTTP on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from tqdm import tqdm

from audit.aggregates.delivery import Delivery, parse_delivery
from audit.application import AuditLog
from audit.cli import RebuildProgress, main
from audit.config import Database, PostgresDatabase, SqliteDatabase, database_from_env
from audit.projections import runner
from audit.projections.objects import ObjectsProjection
from audit.projections.parallel import usable_cores
from audit.projections.runner import Projector, Registration, active_tables
from audit.projections.timelines import SessionTimelines
from audit.samples import sample_bodies
from audit.storage import held_exclusively, postgres_connect_args, store_exists
from tests.conftest import drop_postgres_schema, new_postgres_database, new_secret
from tests.soak.scenario import free_port
from tests.tcp_proxy import TcpProxy
from tests.test_projections import (
    ARRIVAL_COLUMNS,
    FailingOnce,
    all_rows,
    sample_deliveries,
    wait_until,
)
from tests.webhook_helpers import payload

AUDIT = [sys.executable, "-m", "audit.cli"]
SECRET = "CLERK_WEBHOOK_SIGNING_SECRET"


def run_audit(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*AUDIT, *args], env=env, capture_output=True, text=True, timeout=timeout)


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "CLERK_"))}
    env["AUDIT_DATABASE_URL"] = f"sqlite:///{tmp_path / 'audit.db'}"
    return env


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("CLERK_WEBHOOK_SIGNING_SECRET", "", "CLERK_WEBHOOK_SIGNING_SECRET"),
        ("CLERK_WEBHOOK_SIGNING_SECRET", "nope", "CLERK_WEBHOOK_SIGNING_SECRET"),
        ("CLERK_WEBHOOK_SIGNING_SECRET", "whsec_***", "CLERK_WEBHOOK_SIGNING_SECRET"),
        ("AUDIT_DATABASE_URL", "mysql://x/y", "AUDIT_DATABASE_URL"),
        ("AUDIT_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none", "AUDIT_DATABASE_URL"),
        # Not read, so refused: TLS asked for must not quietly become a clear-text connection.
        (
            "AUDIT_DATABASE_URL",
            "postgresql://u@127.0.0.1/d?sslmode=verify-full",
            "AUDIT_DATABASE_URL",
        ),
        ("AUDIT_DATABASE_URL", "postgresql://u@127.0.0.1/d?schema=", "AUDIT_DATABASE_URL"),
        # PostgreSQL's own: a traceback (pg_catalog), or the store's tables made among its own.
        (
            "AUDIT_DATABASE_URL",
            "postgresql://u@127.0.0.1/d?schema=pg_catalog",
            "AUDIT_DATABASE_URL: schema 'pg_catalog' is PostgreSQL's own",
        ),
        (
            "AUDIT_DATABASE_URL",
            "postgresql://u@127.0.0.1/d?schema=information_schema",
            "AUDIT_DATABASE_URL: schema 'information_schema' is PostgreSQL's own",
        ),
        ("AUDIT_MAX_BODY_BYTES", "lots", "AUDIT_MAX_BODY_BYTES"),
        # Each was a file or directory of that odd name, used as a new, empty store (QA).
        (
            "AUDIT_DATABASE_URL",
            "sqlite:///{tmp}/a.db sqlite:///{tmp}/b.db",
            "AUDIT_DATABASE_URL: one database URL, not several",
        ),
        (
            "AUDIT_DATABASE_URL",
            "sqlite:///{tmp}/c.db?mode=ro",
            "AUDIT_DATABASE_URL: a sqlite:/// URL takes a file path only",
        ),
        # Quietly read as the first schema, or without the fragment (QA).
        (
            "AUDIT_DATABASE_URL",
            "postgresql://u@127.0.0.1/d?schema=a&schema=b",
            "AUDIT_DATABASE_URL: the URL names a schema more than once",
        ),
        ("AUDIT_DATABASE_URL", "postgresql://u@127.0.0.1/d#x", "AUDIT_DATABASE_URL: the URL's #"),
        (
            "AUDIT_DATABASE_URL",
            "postgresql://u@127.0.0.1:99999/d",
            "AUDIT_DATABASE_URL: the port is not a number from 1 to 65535",
        ),
    ],
)
def test_bad_configuration_stops_with_one_line(tmp_path, variable, value, needle) -> None:
    env = base_env(tmp_path)
    env["CLERK_WEBHOOK_SIGNING_SECRET"] = new_secret()
    env[variable] = value.replace("{tmp}", str(tmp_path))
    result = run_audit("serve", "--port", "1", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), result.stderr
    assert not any(tmp_path.iterdir())  # no store made


def test_a_blank_database_url_is_unset_as_make_run_takes_it() -> None:
    """'' was the default and ' ' an unknown scheme '' (QA)."""
    default = database_from_env({})
    assert database_from_env({"AUDIT_DATABASE_URL": " \t"}) == default
    assert database_from_env({"AUDIT_DATABASE_URL": ""}) == default


def test_serve_then_send_samples_twice_records_then_duplicates(tmp_path) -> None:
    env = base_env(tmp_path)
    env["CLERK_WEBHOOK_SIGNING_SECRET"] = new_secret()
    env["AUDIT_API_TOKENS"] = "t0ken"
    port = free_port()
    server = subprocess.Popen(
        [*AUDIT, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/webhooks/clerk"
        count = len(list(sample_bodies()))
        first = run_audit("send-samples", "--url", url, env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"recorded {count}, duplicate 0" in first.stdout
        assert "HTTP Request" not in first.stderr  # httpx's line per request
        second = run_audit("send-samples", "--url", url, env=env)
        assert f"recorded 0, duplicate {count}" in second.stdout
        wrong = run_audit("send-samples", "--url", url, env={**env, SECRET: new_secret()})
        assert wrong.returncode == 1
        [counted, failed] = wrong.stdout.splitlines()  # one line for one cause, not one a sample
        assert counted == "recorded 0, duplicate 0"
        assert failed.startswith(f"failed all {count}: 401 ")
        assert failed.endswith("(is CLERK_WEBHOOK_SIGNING_SECRET the server's?)")
    finally:
        server.terminate()
        server.wait(timeout=15)

    status = run_audit("projections", env=env)
    assert status.returncode == 0
    assert "objects" in status.stdout and "live" in status.stdout
    shown = run_audit("show", "user_3XIOWrI57CYv83K9cu9aN3gSz5Q", env=env)
    assert shown.returncode == 0 and '"deleted": true' in shown.stdout
    earlier = run_audit(
        "show", "user_3XIOWrI57CYv83K9cu9aN3gSz5Q", "--as-of", "2024-05-28T08:06:00Z", env=env
    )
    assert earlier.returncode == 0 and '"deleted": false' in earlier.stdout
    before = run_audit("show", "user_3XIOWrI57CYv83K9cu9aN3gSz5Q", "--as-of", "1900-01-01", env=env)
    assert (before.returncode, before.stdout) == (1, "")
    assert before.stderr.strip().endswith(
        "nothing recorded about it as of 1900-01-01T00:00:00.000Z"
    )
    rebuilt = run_audit("rebuild", "--all", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "reads switched" in rebuilt.stdout


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/webhooks/clerk", "http://[::1"])
def test_send_samples_to_nothing_listening_says_so_in_one_line(tmp_path, url: str) -> None:
    env = base_env(tmp_path)
    env["CLERK_WEBHOOK_SIGNING_SECRET"] = new_secret()
    url = url.format(port=free_port())
    result = run_audit("send-samples", "--url", url, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"audit send-samples: {url}: "), result.stderr


def test_rebuild_all_switches_every_projection_and_loses_nothing(
    tmp_path: Path, log: AuditLog
) -> None:
    """On PostgreSQL the projections are rebuilt in processes; on SQLite in this one."""
    log.record(sample_deliveries())
    projector = Projector(log)
    projector.run_once()
    before = all_rows(log.db, drop=ARRIVAL_COLUMNS)
    generations = {name: active_tables(log.db, name).generation for name in projector.projections}
    env = base_env(tmp_path)
    env["AUDIT_DATABASE_URL"] = log.database.url
    rebuilt = run_audit("rebuild", "--all", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    in_processes = "in 2 processes: objects | events, timelines" in rebuilt.stdout
    expected = isinstance(log.database, PostgresDatabase) and usable_cores() == 2
    assert in_processes == expected
    for name, generation in generations.items():
        assert f"{name}: reads switched to generation {generation + 1}" in rebuilt.stdout
        assert active_tables(log.db, name).generation == generation + 1
    assert all_rows(log.db, drop=ARRIVAL_COLUMNS) == before


@pytest.mark.parametrize(
    ("option", "value"), [("--port", "99999"), ("--port", "-1"), ("--workers", "0")]
)
def test_serve_refuses_a_port_or_worker_count_out_of_range_in_one_line(
    tmp_path, option: str, value: str
) -> None:
    env = base_env(tmp_path)
    env["CLERK_WEBHOOK_SIGNING_SECRET"] = new_secret()
    result = run_audit("serve", option, value, env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"audit serve: error: argument {option}")
    )
    assert "Traceback" not in result.stderr


def url_of(database: Database) -> str:
    """The AUDIT_DATABASE_URL of a test's database (conftest's `database`, either backend)."""
    if isinstance(database, SqliteDatabase):
        return f"sqlite:///{database.path}"
    password = f":{database.password}" if database.password else ""
    return (
        f"postgresql://{database.user}{password}@{database.host}:{database.port}"
        f"/{database.dbname}?schema={database.schema}"
    )


def record(database: Database, *bodies: dict[str, Any]) -> None:
    """Store these deliveries as the webhook would (svix ids msg_0, msg_1 ...)."""
    log = AuditLog(database)
    try:
        log.record(
            [
                parse_delivery(
                    json.dumps(body).encode(), svix_id=f"msg_{i}", svix_timestamp=1, received_at=1
                )
                for i, body in enumerate(bodies)
            ]
        )
    finally:
        log.close()


def test_show_as_of_any_later_time_is_show_now(tmp_path, database: Database) -> None:
    """A user known by a session alone, an organization by a membership alone: `show` printed
    the aggregate, and `show --as-of` after every event said nothing was recorded about it
    (found by review)."""
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(database)}
    session, membership = payload("session.created"), payload("organizationMembership.created")
    record(database, session, membership)
    for clerk_id in (session["data"]["user_id"], membership["data"]["organization"]["id"]):
        now = run_audit("show", clerk_id, env=env)
        assert now.returncode == 0, now.stderr
        later = run_audit("show", clerk_id, "--as-of", "2100-01-01", env=env)
        assert later.returncode == 0, later.stderr
        assert json.loads(later.stdout) == json.loads(now.stdout)
        assert json.loads(now.stdout)["data"] is None  # no version of the object itself
        # Empty is refused, as the API refuses `as_of=`: it was taken as no --as-of (QA).
        empty = run_audit("show", clerk_id, "--as-of", "", env=env)
        assert (empty.returncode, empty.stdout) == (2, "")
        assert empty.stderr.startswith("--as-of: '' is neither ISO 8601 nor epoch milliseconds")
        before = run_audit("show", clerk_id, "--as-of", "1900-01-01", env=env)
        assert before.returncode == 1
        assert before.stderr.strip().endswith(
            "nothing recorded about it as of 1900-01-01T00:00:00.000Z"
        )


def test_show_into_a_reader_that_stops_early_is_quiet(tmp_path: Path) -> None:
    """`audit show ... | head` printed a BrokenPipeError traceback (found by review)."""
    database = SqliteDatabase(path=tmp_path / "audit.db")
    user = payload("user.created")
    user["data"]["unsafe_metadata"] = {"notes": "x" * 300_000}  # more than a pipe holds
    record(database, user)
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(database)}
    show = subprocess.Popen(
        [*AUDIT, "show", user["data"]["id"]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert show.stdout is not None and show.stderr is not None
    assert show.stdout.read(1) == b"{"
    show.stdout.close()  # as `head -1` does once it has its line
    errors = show.stderr.read().decode()
    assert show.wait(timeout=60) == 0
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors


def test_show_takes_the_secrets_out_as_the_api_does(tmp_path, database: Database) -> None:
    """What `audit show` prints is pasted into tickets: no code, no invitation url."""
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(database)}
    user = payload("user.created")
    user["data"]["private_metadata"] = {"otp_code": "73519864"}
    invitation = payload("organizationInvitation.created")
    url = invitation["data"]["url"]
    record(database, user, invitation)
    for clerk_id, secret in (
        (user["data"]["id"], "73519864"),
        (invitation["data"]["organization_id"], url),
    ):
        shown = run_audit("show", clerk_id, env=env)
        assert shown.returncode == 0, shown.stderr
        assert secret not in shown.stdout
    assert '"otp_code": "[redacted]"' in run_audit("show", user["data"]["id"], env=env).stdout


@pytest.mark.parametrize(
    "command", [["serve", "--port", "1"], ["project", "--once"], ["projections"], ["verify"]]
)
def test_a_file_that_is_not_a_database_is_one_line(tmp_path, command: list[str]) -> None:
    """It was a 53-line traceback, exit 1 (found by review)."""
    env = {**base_env(tmp_path), "CLERK_WEBHOOK_SIGNING_SECRET": new_secret()}
    (tmp_path / "audit.db").write_text("notes, not a database\n")
    result = run_audit(*command, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("AUDIT_DATABASE_URL: cannot use the database at sqlite:///")
    assert line.endswith(": file is not a database")


def test_rebuilding_an_unknown_projection_is_a_usage_error(tmp_path: Path) -> None:
    """It exited 1, as a missing record does, and only after opening the store."""
    result = run_audit("rebuild", "nope", env=base_env(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == "audit rebuild: no such projection 'nope' (known: events, objects, timelines)"
    assert not (tmp_path / "audit.db").exists()


@pytest.mark.parametrize(
    "command", [["projections"], ["show", "user_x"], ["rebuild", "--all"], ["verify"]]
)
def test_reading_a_store_never_opened_is_one_line_and_creates_nothing(
    tmp_path, database: Database, command: list[str]
) -> None:
    """A typo in AUDIT_DATABASE_URL made an empty store that looked healthy (all projections
    live at position 0); only `serve` and `project`, which record or follow, create one."""
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(database)}
    result = run_audit(*command, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("AUDIT_DATABASE_URL: no store at ")
    assert not store_exists(database)


@pytest.mark.parametrize("command", [["projections"], ["show", "user_x"], ["verify"]])
def test_a_database_of_something_else_is_no_store_and_is_left_as_it_was(
    tmp_path, database: Database, command: list[str]
) -> None:
    """An existing SQLite file or PostgreSQL schema (`public`, another application's) passed
    for a store: the store's tables were created in it, and `verify` sealed it as an empty
    store that was "ok" (found by review)."""
    theirs = "CREATE TABLE invoices (id INTEGER PRIMARY KEY)"
    if isinstance(database, SqliteDatabase):
        with contextlib.closing(sqlite3.connect(database.path)) as conn:
            conn.execute(theirs)
            conn.commit()

        def tables() -> list[str]:
            with contextlib.closing(sqlite3.connect(database.path)) as conn:
                return [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    else:
        assert isinstance(database, PostgresDatabase)
        with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{database.schema}"')
            conn.execute(theirs.replace("invoices", f'"{database.schema}".invoices'))

        def tables() -> list[str]:
            with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
                found = conn.execute(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n"
                    " ON n.oid = c.relnamespace WHERE n.nspname = %s",
                    [database.schema],
                )
                return [r[0] for r in found]

    before = tables()
    assert "invoices" in before
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(database)}
    result = run_audit(*command, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("AUDIT_DATABASE_URL: no store at ")
    assert tables() == before


def test_a_rebuild_while_another_runs_is_refused_and_changes_nothing(
    tmp_path: Path, log: AuditLog
) -> None:
    """Two at once each dropped the other's build, and one then said it had switched (on
    PostgreSQL they could deadlock instead). This test holds the lock `audit rebuild` takes."""
    log.record(sample_deliveries())
    projector = Projector(log)
    projector.run_once()
    before = {name: projector.registration(name) for name in projector.projections}
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    with held_exclusively(log.database, "rebuild"):
        refused = run_audit("rebuild", "--all", env=env)
    assert refused.returncode == 3
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("audit rebuild: another `audit rebuild` is running on this store")
    assert {name: projector.registration(name) for name in before} == before
    # The lock went with its holder.
    rebuilt = run_audit("rebuild", "objects", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    generation = before["objects"].generation + 1
    assert f"objects: reads switched to generation {generation}" in rebuilt.stdout


def test_a_store_at_another_version_is_reported_and_a_downgrade_refused(
    tmp_path: Path, log: AuditLog
) -> None:
    """Review E: `audit projections`, a status command, registered this release's build on a
    store an older release had left; an older release's `audit rebuild` switched a newer store
    back to its own version, which the newer release's processes then did not step."""
    log.record(sample_deliveries()[:6])
    projector = Projector(log)
    projector.run_once()
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    ours = ObjectsProjection.version

    def store_version(version: int) -> Registration:
        with log.db.transaction() as cursor:
            cursor.execute(
                log.db.sql(
                    f"UPDATE {log.db.table('projection_registry')} SET version = %s"
                    " WHERE name = 'objects'"
                ),
                [version],
            )
        return projector.registration("objects")

    left_by_older = store_version(ours - 1)
    status = run_audit("projections", env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == (
        f"objects: reads use v{ours - 1}; this release's `audit serve` or `audit project`"
        f" will build v{ours}"
    )
    assert projector.registration("objects") == left_by_older  # nothing written

    left_by_newer = store_version(ours + 1)
    status = run_audit("projections", env=env)
    assert status.stdout.splitlines()[-1] == (
        f"objects: reads use v{ours + 1}, which this release (v{ours}) cannot step"
    )
    events = projector.registration("events")
    for command in (["rebuild", "objects"], ["rebuild", "--all"]):
        refused = run_audit(*command, env=env)
        assert refused.returncode == 1
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith(
            f"audit rebuild: objects is at v{ours + 1} (live or being built), newer than this"
            f" release's v{ours}."
        )
        assert projector.registration("objects") == left_by_newer
        assert projector.registration("events") == events  # --all started none
        target = "--all" if "--all" in command else "objects"
        assert line.endswith(f"`audit rebuild {target} --downgrade`")
    rolled_back = run_audit("rebuild", "objects", "--downgrade", env=env)
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert projector.registration("objects").version == ours


def many_users(count: int) -> list[Delivery]:
    """`count` deliveries of `user.updated`, each of another user: enough for a rebuild of
    several steps."""
    user = payload("user.updated")
    return [
        parse_delivery(
            json.dumps({**user, "data": {**user["data"], "id": f"user_{i}"}}).encode(),
            svix_id=f"msg_{i}",
            svix_timestamp=1,
            received_at=1,
        )
        for i in range(count)
    ]


def first_step_of(rebuild: subprocess.Popen[str]) -> str:
    """What a running `audit rebuild` wrote to stderr up to its bar's first step."""
    assert rebuild.stderr is not None
    seen = ""
    while not re.search(r"\| *[1-9]\d*/\d+ ", seen):
        read = rebuild.stderr.read(1)
        assert read, f"the rebuild ended before its first step: {seen}"
        seen += read
    return seen


def test_a_rebuild_through_another_path_to_the_file_takes_the_same_lock(
    tmp_path: Path, log: AuditLog
) -> None:
    """The lock was named after the path as given: through a symlink a second rebuild ran
    beside the first, dropped its build, and the first said it had switched (found by
    review). A file's paths are SQLite's; PostgreSQL's lock is the schema's."""
    if not isinstance(log.database, SqliteDatabase):
        pytest.skip("a store reached by two paths is a SQLite file's")
    log.record(sample_deliveries())
    Projector(log).run_once()
    link = tmp_path / "link.db"
    link.symlink_to(log.database.path)
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": f"sqlite:///{link}"}
    with held_exclusively(log.database, "rebuild"):
        refused = run_audit("rebuild", "objects", env=env)
    assert refused.returncode == 3, refused.stdout


def signalled_rebuild(env: dict[str, str], signum: signal.Signals) -> tuple[int, str]:
    """`audit rebuild --all` sent `signum` at its bar's first step: its exit status, and what
    was written to its stderr to the end (every process that could write to it has ended)."""
    rebuild = subprocess.Popen(
        [*AUDIT, "rebuild", "--all"], env=env, stderr=subprocess.PIPE, text=True
    )
    first_step_of(rebuild)
    rebuild.send_signal(signum)
    assert rebuild.stderr is not None
    rest = rebuild.stderr.read()
    return rebuild.wait(timeout=60), rest


def assert_a_run_applies_the_rest(env: dict[str, str], log: AuditLog) -> None:
    again = run_audit("project", "--once", env=env)
    assert again.returncode == 0, again.stderr
    status = Projector(log).status()
    assert status and all(row["lag"] == 0 and row["state"] == "live" for row in status), status


def test_ctrl_c_stops_a_rebuild_with_one_line(tmp_path: Path, log: AuditLog) -> None:
    """It printed KeyboardInterrupt's traceback (found by review)."""
    log.record(many_users(3000))
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    status, rest = signalled_rebuild(env, signal.SIGINT)
    assert status == 128 + signal.SIGINT
    assert "Traceback" not in rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("audit rebuild: interrupted. A build not yet switched is carried on")


def test_a_rebuild_killed_alone_leaves_its_processes_quiet(tmp_path: Path, log: AuditLog) -> None:
    """SIGTERM to `audit rebuild --all` alone (not its process group): on PostgreSQL its
    processes, finding their pipe to it broken, each printed two chained tracebacks (QA).
    They end without a word, as the build is carried on by the next run."""
    log.record(many_users(10_000))
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    status, rest = signalled_rebuild(env, signal.SIGTERM)
    assert status == -signal.SIGTERM
    assert "Traceback" not in rest, rest
    assert_a_run_applies_the_rest(env, log)


def test_ctrl_c_stops_project_once_with_one_line(tmp_path: Path, log: AuditLog) -> None:
    """It printed KeyboardInterrupt's traceback and died by the signal (QA). Each step commits
    whole or not at all, so a run after it applies the rest."""
    log.record(many_users(20_000))  # steps enough that the signal lands before the end
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    project = subprocess.Popen(
        [*AUDIT, "project", "--once"], env=env, stderr=subprocess.PIPE, text=True
    )
    tracking = log.db.table(log.db.tracking_table)

    def stepped() -> bool:
        with contextlib.suppress(Exception):  # not made yet by the child
            row = log.db.fetchone(
                f"SELECT MAX(notification_id) AS last FROM {tracking}"
                " WHERE application_name LIKE %s",
                ["projection:%"],
            )
            return bool(row and row["last"])
        return False

    wait_until(stepped, "audit project --once made no step")
    project.send_signal(signal.SIGINT)
    assert project.stderr is not None
    said = project.stderr.read()
    assert project.wait(timeout=60) == 128 + signal.SIGINT, said
    assert "Traceback" not in said
    assert said.strip().splitlines()[-1].startswith("audit project: interrupted;")
    assert_a_run_applies_the_rest(env, log)


@pytest.mark.postgres
def test_losing_the_database_mid_rebuild_says_so_in_a_few_lines(tmp_path: Path) -> None:
    """It printed each process's chained tracebacks, some 460 lines, for a network blip."""
    database = new_postgres_database()
    proxy = TcpProxy(database.host, database.port)
    proxy.start()
    log = AuditLog(database)
    try:
        log.record(many_users(3000))
        env = {**base_env(tmp_path)}
        env["AUDIT_DATABASE_URL"] = url_of(replace(database, host="127.0.0.1", port=proxy.port))
        rebuild = subprocess.Popen(
            [*AUDIT, "rebuild", "--all"], env=env, stderr=subprocess.PIPE, text=True
        )
        seen = first_step_of(rebuild)  # cut then
        proxy.stop()
        rest = rebuild.stderr.read()
        assert rebuild.wait(timeout=60) == 1
    finally:
        log.close()
        proxy.stop()
        drop_postgres_schema(database)
    lines = [line for line in (seen + rest).splitlines() if "records/s]" not in line]
    assert "Traceback" not in rest
    assert lines[-1].startswith("audit rebuild: the database could not be used: ")
    assert len(lines) <= 12, "\n".join(lines)


@contextlib.contextmanager
def dev_server(
    tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """`make run` on a free port (8000 may be taken): the process, its URL and the seven lines
    it prints first; stopped on leaving."""
    port = free_port()
    devserver = subprocess.Popen(
        [sys.executable, "-m", "audit.devserver", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert devserver.stdout is not None
        lines = [devserver.stdout.readline() for _ in range(7)]
        yield devserver, f"http://127.0.0.1:{port}", lines
    finally:
        devserver.terminate()
        devserver.wait(timeout=30)


def test_make_run_shows_the_secret_and_token_the_server_takes(tmp_path: Path) -> None:
    """Where the environment overrides var/'s, the hints showed var/'s (401 on every try)."""
    env = base_env(tmp_path)
    secret = new_secret()
    env.update(CLERK_WEBHOOK_SIGNING_SECRET=f"{secret} {new_secret()}", AUDIT_API_TOKENS="t0ken")
    with dev_server(tmp_path, env) as (_, url, lines):
        pass
    assert (
        f"  CLERK_WEBHOOK_SIGNING_SECRET={secret} .venv/bin/audit send-samples"
        f" --url {url}/webhooks/clerk\n"
    ) in lines
    assert f"  curl -H 'Authorization: Bearer t0ken' {url}/v1/events\n" in lines
    assert (tmp_path / "var" / "dev-signing-secret").read_text().strip() != secret


def test_make_run_takes_empty_variables_as_unset(tmp_path: Path) -> None:
    """An empty secret stopped the server after it printed hints; empty tokens started it
    with none, so the printed curl got 401."""
    env = {**base_env(tmp_path), "CLERK_WEBHOOK_SIGNING_SECRET": "", "AUDIT_API_TOKENS": " "}
    with dev_server(tmp_path, env) as (devserver, url, lines):
        [curl] = [line for line in lines if line.startswith("  curl -H 'Authorization: Bearer ")]
        token = curl.split("Bearer ", 1)[1].split("'", 1)[0]
        assert token == (tmp_path / "var" / "dev-api-token").read_text().strip()

        def answered() -> bool:
            assert devserver.poll() is None, "the server stopped"
            try:
                headers = {"Authorization": f"Bearer {token}"}
                return httpx.get(f"{url}/v1/projections", headers=headers).is_success
            except httpx.TransportError:
                return False  # not listening yet

        wait_until(answered, "the printed token never got an answer")


def test_the_rebuild_progress_bar_ends_full_when_positions_have_gaps(
    tmp_path: Path, log: AuditLog
) -> None:
    """The bar's total was the last position; a rolled-back append (two deliveries of one
    svix-id racing, a lost connection) leaves a gap in PostgreSQL's positions, as this test's
    `nextval` does, and the bar stopped short of 100%. (SQLite's positions have no gaps.)"""
    deliveries = sample_deliveries()
    log.record(deliveries[:3])
    if isinstance(log.database, PostgresDatabase):
        events = log.db.table(log.db.events_table)
        for _ in range(5):
            log.db.fetchone(
                "SELECT nextval(pg_get_serial_sequence(%s, 'notification_id')) AS n", [events]
            )
    log.record(deliveries[3:])
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    rebuilt = run_audit("rebuild", "objects", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    records = 2 * len(deliveries)
    last_bar = re.split(r"[\r\n]", rebuilt.stderr.strip())[-1]
    assert f" {records}/{records} " in last_bar, last_bar


def test_the_rebuild_progress_bar_takes_in_deliveries_that_arrive_during_the_rebuild(
    log: AuditLog,
) -> None:
    """The rebuild reads what arrives while it runs, so its bar went past its total (120%);
    when the count would pass it, the store is counted again. Arrivals come after the first
    step here, from the progress callback itself, so they land mid-rebuild every time."""
    deliveries = sample_deliveries()
    half = len(deliveries) // 2
    log.record(deliveries[:half])
    projector = Projector(log, batch_size=4)
    names = ("events", "objects")
    for name in names:
        projector.rebuild(name)
    out = io.StringIO()
    with tqdm(file=out) as bar:
        progress = RebuildProgress(bar, projector.db.stored_records, builds=len(names))
        assert bar.total == len(names) * 2 * half

        def arrivals_after_the_first_step(name: str, records: int) -> None:
            if bar.n == 0:
                log.record(deliveries[half:])
            progress(name, records)
            assert bar.n <= bar.total

        projector.catch_up(
            *(projector.projections[name] for name in names),
            progress=arrivals_after_the_first_step,
        )
        everything = len(names) * 2 * len(deliveries)
        assert (bar.n, bar.total) == (everything, everything)


def test_the_rebuild_progress_bar_ends_full_when_another_process_stepped_the_build(
    log: AuditLog,
) -> None:
    """A running `audit serve` or `audit project` steps the build too, so the rebuild read only
    part of the store itself: its bar stopped at 33-86%, then it said the builds had switched
    (found by review). Here another projector steps the build after the rebuild's first step."""
    log.record(sample_deliveries())
    projector = Projector(log, batch_size=4)
    projector.rebuild("objects")
    serving = Projector(log, batch_size=4)  # as `audit serve`'s child
    out = io.StringIO()
    with tqdm(file=out) as bar:
        progress = RebuildProgress(bar, projector.db.stored_records, builds=1)

        def another_process_steps_too(name: str, records: int) -> None:
            if bar.n == 0:
                serving.run_once()  # the rest of the build, and its switch
            progress(name, records)

        projector.catch_up(projector.projections["objects"], progress=another_process_steps_too)
        assert bar.n < bar.total  # what this process read itself
        progress.finish()
        assert bar.n == bar.total


def test_reading_commands_open_a_store_another_process_is_writing(
    tmp_path: Path, log: AuditLog
) -> None:
    """Opening the store re-created its immutability triggers in a write transaction, so on
    SQLite `audit projections` and `audit show` waited 30 s for a writer's lock, then failed
    with a traceback (review C). A store whose triggers are in place opens without a write."""
    if isinstance(log.database, PostgresDatabase):
        pytest.skip(
            "PostgreSQL: a write holds the events table for milliseconds, and opening waits for"
            " it anyway (eventsourcing's CREATE UNIQUE INDEX IF NOT EXISTS at start)"
        )
    deliveries = sample_deliveries()
    log.record(deliveries)
    Projector(log).run_once()
    user_id = next(d.subject_id for d in deliveries if d.type.startswith("user."))
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    assert isinstance(log.database, SqliteDatabase)
    writer = sqlite3.connect(log.database.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    try:
        for command in (["projections"], ["show", str(user_id)]):
            result = run_audit(*command, env=env)
            assert result.returncode == 0, (command, result.stderr[-400:])
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize(
    "command",
    [
        ["projections"],
        ["show", "user_x"],
        ["rebuild", "--all"],
        ["project", "--once"],
        ["send-samples", "--url", "http://127.0.0.1:9/webhooks/clerk"],
        ["verify"],
    ],
)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLERK_WEBHOOK_SIGNING_SECRET", "abc"),
        ("CLERK_WEBHOOK_SIGNING_SECRET", "whsec_@@@"),
        ("AUDIT_MAX_BODY_BYTES", "abc"),
        ("AUDIT_MAX_BODY_BYTES", "0"),
    ],
)
def test_every_command_stops_on_a_bad_variable_with_one_line(
    tmp_path: Path, command: list[str], variable: str, value: str
) -> None:
    """SPEC 1: bad configuration stops the program with one line naming the variable. Only
    `serve` read the secret and the body limit, so `audit project` ran on with a secret that
    would stop `audit serve` (review C). A secret left unset is still fine but for `serve`."""
    env = {**base_env(tmp_path), "CLERK_WEBHOOK_SIGNING_SECRET": new_secret(), variable: value}
    result = run_audit(*command, env=env)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{variable}: "), line
    assert not (tmp_path / "audit.db").exists()


def test_show_says_why_it_has_nothing_to_show(tmp_path: Path, log: AuditLog) -> None:
    """`audit show` said "nothing recorded about it" of a user four events name (a member of
    an organization, with no user.* event of their own), and of a session id, which it does
    not take (review E). It now says what the API's 404 says, or what it takes; while the
    events index is behind the store it cannot tell, and says so (review F)."""
    log.record(sample_deliveries())
    env = {**base_env(tmp_path), "AUDIT_DATABASE_URL": url_of(log.database)}
    member = "user_3ZdpuWvXe6A43qR6avXueEkyC5D"  # named by the sample membership only

    def said(concern: str) -> str:
        return (
            f"{member}: no user.* event is recorded for it, so its state is unknown; {concern}:"
            f" /v1/events?subject={member}"
        )

    result = run_audit("show", member, env=env)
    assert (result.returncode, result.stderr.strip()) == (1, said("other events may concern it"))
    Projector(log).run_once()
    result = run_audit("show", member, env=env)
    assert (result.returncode, result.stderr.strip()) == (1, said("other events concern it"))
    assert run_audit("show", "user_nobody", env=env).stderr.strip() == (
        "user_nobody: nothing recorded about it"
    )
    session = run_audit("show", "sess_3nuW", env=env)
    assert session.returncode == 2
    assert session.stderr.strip() == (
        "audit show: 'sess_3nuW' is neither a user (user_...) nor an organization (org_...);"
        " the events about any id: /v1/events?subject=sess_3nuW"
    )


def test_a_rebuild_says_its_build_switched_though_a_live_step_failed(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit rebuild NAME` in this process, to make one step fail: the live generation's (a
    full disk, a lock timeout). The build goes on and switches; it said that the database
    could not be used and that the build was not yet switched (found by review)."""
    log.record(sample_deliveries())
    failing = FailingOnce()
    projections = [failing, SessionTimelines(), ObjectsProjection()]
    Projector(log, projections).run_once()
    failing.fails = 1
    monkeypatch.setattr(runner, "all_projections", lambda: projections)
    monkeypatch.setenv("AUDIT_DATABASE_URL", url_of(log.database))
    assert main(["rebuild", "events"]) == 1
    out, err = capsys.readouterr()
    assert "events: reads switched to generation 2" in out
    assert "rebuild failed:\nthe database could not be used: disk I/O error" in err
    assert "(in projection events, generation 1)" in err
    assert active_tables(log.db, "events").generation == 2
