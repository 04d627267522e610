"""Fixtures: every behaviour runs against SQLite and PostgreSQL.

PostgreSQL tests use AUDIT_TEST_POSTGRES_URL (default: the local server's `test` database), each
in a schema of its own that is dropped afterwards. Outside CI they skip, with the reason, when no
server answers; in CI (CI=true) an unreachable server fails them instead.
"""

from __future__ import annotations

import base64
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings
from psycopg import sql as pgsql
from starlette.testclient import TestClient

from api.app import create_app
from audit.application import AuditLog
from audit.config import Database, PostgresDatabase, Settings, SqliteDatabase, parse_database_url
from audit.storage import postgres_connect_args

POSTGRES_URL = os.environ.get(
    "AUDIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# No per-example deadline, for every test (said here only): these properties check what is
# computed, not how fast, and a loaded machine can stall any example past hypothesis's 200 ms.
# (With CI set, hypothesis's own `ci` profile is the default and drops it too; the rest of that
# profile is kept.)
hypothesis_settings.register_profile("audit", parent=hypothesis_settings.default, deadline=None)
hypothesis_settings.load_profile("audit")
API_TOKEN = "test-token-" + secrets.token_hex(8)


def _postgres_problem() -> str | None:
    database = parse_database_url(POSTGRES_URL)
    assert isinstance(database, PostgresDatabase)
    try:
        with psycopg.connect(**postgres_connect_args(database)) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL at {database.url} ({str(exc).strip().splitlines()[0]})"
    return None


_POSTGRES_PROBLEM: list[str | None] = []


def postgres_problem() -> str | None:
    if not _POSTGRES_PROBLEM:
        _POSTGRES_PROBLEM.append(_postgres_problem())
    return _POSTGRES_PROBLEM[0]


def new_postgres_database() -> PostgresDatabase:
    problem = postgres_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"PostgreSQL tests must run in CI: {problem}")
        pytest.skip(f"PostgreSQL tests skipped: {problem}; set AUDIT_TEST_POSTGRES_URL")
    database = parse_database_url(POSTGRES_URL)
    assert isinstance(database, PostgresDatabase)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    return PostgresDatabase(
        host=database.host,
        port=database.port,
        user=database.user,
        password=database.password,
        dbname=database.dbname,
        schema=schema,
    )


def drop_postgres_schema(database: PostgresDatabase) -> None:
    with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(database.schema))
        )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        yield SqliteDatabase(path=tmp_path / "audit.db")
        return
    database = new_postgres_database()
    try:
        yield database
    finally:
        drop_postgres_schema(database)


@pytest.fixture
def log(database: Database) -> Iterator[AuditLog]:
    audit_log = AuditLog(database)
    try:
        yield audit_log
    finally:
        audit_log.close()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def settings(database: Database, secret: str) -> Settings:
    return Settings(
        signing_secrets=(secret,),
        database=database,
        api_tokens=(API_TOKEN,),
        max_body_bytes=1_048_576,
    )


@pytest.fixture
def client(settings: Settings, log: AuditLog) -> Iterator[TestClient]:
    with TestClient(create_app(settings, log), raise_server_exceptions=False) as test_client:
        yield test_client
