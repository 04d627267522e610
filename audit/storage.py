"""The database edge: how each backend is configured for eventsourcing, protected, and queried.

Everything dialect-specific lives here. The rest of the code writes SQL with `%s` placeholders and
named columns, and runs it through `Db`, which adapts it to SQLite or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TypeVar
from uuid import UUID

import psycopg
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from eventsourcing.persistence import PersistenceError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor
from psycopg import sql as pgsql
from psycopg_pool import PoolTimeout

from audit.config import Database, PostgresDatabase, SqliteDatabase

Dialect = Literal["sqlite", "postgresql"]
T = TypeVar("T")
APPLICATION_NAME = "audit"
logger = logging.getLogger(__name__)

# How long a write waits for SQLite's write lock before it gives up (then: 503, retry).
SQLITE_LOCK_TIMEOUT_SECONDS = 30
# The longest a projection step waits for webhook appends on SQLite (AppendsFirst): under a
# constant stream of them, its turn comes at least this often.
APPENDS_FIRST_SECONDS = 0.5
# Which organization owns each sub-object (membership, invitation, domain), so that a deletion
# stub naming none finds its stream. Written in the transaction that appends the deliveries.
OWNER_INDEX = "owner_index"
OWNER_INDEX_COLUMNS = "(object_id TEXT PRIMARY KEY, organization_id TEXT NOT NULL)"


def owner_index_holds(*ids: str) -> bool:
    """Whether these ids go in the owner index: not with a NUL, on any backend. PostgreSQL text
    cannot hold one, and U+FFFD in its place would name another object; so a stub of such an
    object stays in a stream of its own, however the deliveries were batched."""
    return not any("\x00" in clerk_id for clerk_id in ids)


class StoreUnavailable(Exception):
    """The database cannot be reached or cannot take the write now; a retry may succeed."""


# How long a request waits for a pooled PostgreSQL connection, and a new one takes to connect.
CONNECTION_WAIT_SECONDS = 3
# How long the pool keeps retrying one lost connection before it gives up and leaves the next
# request to start afresh. psycopg_pool doubles its delay between tries (1, 2, 4, 8 s ...) for
# up to 300 s by default: after a long outage its next try could be a minute away, and every
# delivery meanwhile would get 503 although the database was back. Shorter than the wait, so
# the first request after the database returns gets a connection.
RECONNECT_GIVE_UP_SECONDS = 2.0
# How a connection whose server has gone silent (a failover moving the database's address, a
# dropped network path) is given up, rather than waited on for the kernel's defaults: two
# hours before the first keepalive probe, about fifteen minutes of retransmissions. libpq's
# options: probes after 30 s idle, every 10 s, 3 unanswered ones close it; data unacknowledged
# for 60 s closes it (TCP_USER_TIMEOUT, Linux). A live server answers probes from its kernel,
# so a long query is not cut.
TCP_LIVENESS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}

# What a lost connection, a refused connect, a pool timeout or a busy SQLite file raise.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.OperationalError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    StoreOperationalError,
    StoreInterfaceError,
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, and so on."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# PostgreSQL's error classes that are the database failing, not the statement's data: lost
# connections (08), deadlocks and serialization (40), resources such as a full disk (53),
# cancelled queries and shutdowns (57), I/O (58); and a lock wait timed out (55P03). Not
# class 54 (an index row too large, say), which psycopg raises as OperationalError too but
# which the data causes.
_FAILURE_CLASSES = ("08", "40", "53", "57", "58")
_FAILURE_STATES = ("55P03",)


def is_database_failure(exc: BaseException) -> bool:
    """Whether `exc` is the database failing (a lost connection, a lock or statement timeout, a
    cancelled query, a deadlock, a full disk), or was raised from or while handling one: not
    something about the data a statement carried, which would fail again the same way."""
    wrapped = False  # eventsourcing's own error, which says no more than that
    for cause in _causes(exc):
        if isinstance(cause, psycopg.Error):
            state = cause.sqlstate
            if state is None:  # no answer from the server: the connection, a pool timeout
                return isinstance(cause, (psycopg.OperationalError, psycopg.InterfaceError))
            return state[:2] in _FAILURE_CLASSES or state in _FAILURE_STATES
        if isinstance(cause, sqlite3.OperationalError):  # locked, I/O, disk full
            return True
        wrapped = wrapped or isinstance(cause, (StoreOperationalError, StoreInterfaceError))
    return wrapped


_SQLITE_ERROR = 1  # a statement's SQL: a syntax error, a missing table, a limit of the engine


def is_statement_refused(exc: BaseException) -> bool:
    """Whether the database refused one statement for itself, not for being unavailable: past
    one of its limits (too many variables, an expression too deep; SQLite's generic SQL error,
    PostgreSQL's class 54). The same statement fails again alike, so it is a fault to report,
    not a 503 a client retries for ever. (SQLite's "no such table" is SQL errors' one
    exception: a generation switched away under a read, which looks it up again.)"""
    for cause in _causes(exc):
        if isinstance(cause, psycopg.Error):
            return cause.sqlstate is not None and cause.sqlstate.startswith("54")
        if isinstance(cause, sqlite3.Error):
            code = getattr(cause, "sqlite_errorcode", None)
            refused = code is not None and code & 0xFF == _SQLITE_ERROR
            return refused and "no such table" not in str(cause)
    return False


# PostgreSQL shutting down, crashed, or still starting: no statement of any step can run.
_SHUTDOWN_STATES = ("57P01", "57P02", "57P03")
# SQLite's primary result codes for the file, not a statement: busy or locked (its one write
# lock, waited for up to SQLITE_LOCK_TIMEOUT_SECONDS), read-only, I/O, full, cannot open.
_SQLITE_FILE_CODES = frozenset({5, 6, 8, 10, 13, 14})


def is_store_down(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be used by anyone now (a refused or lost
    connection, a pool timeout, a shutdown), rather than failing one statement: a lock timeout
    on one table, a statement timeout, an index that cannot be built. Every step would fail
    alike, so a runner stops its round instead of trying each projection in turn."""
    down = False  # unless a database error says which
    for cause in _causes(exc):
        if isinstance(cause, psycopg.Error):
            state = cause.sqlstate
            if state is None:  # no answer from the server, or psycopg refusing a parameter
                return isinstance(cause, (psycopg.OperationalError, psycopg.InterfaceError))
            return state[:2] == "08" or state in _SHUTDOWN_STATES
        if isinstance(cause, sqlite3.Error):
            code = getattr(cause, "sqlite_errorcode", None)
            return code is not None and code & 0xFF in _SQLITE_FILE_CODES
        down = down or isinstance(cause, (StoreUnavailable, OSError))
    return down


def unavailable_reason(exc: BaseException) -> str | None:
    """The first line of why the database could not be used, when that is what `exc` is, or
    was raised from or while handling, with what its notes say (which projection, say); None
    for anything else (a bug keeps its traceback). A group: its members' reasons, if each
    has one."""
    if isinstance(exc, BaseExceptionGroup):
        reasons = [unavailable_reason(member) for member in exc.exceptions]
        if None in reasons:
            return None
        return "; ".join(dict.fromkeys(reason for reason in reasons if reason))
    for cause in _causes(exc):
        if isinstance(cause, (*UNAVAILABLE_ERRORS, StoreUnavailable, OSError, sqlite3.Error)):
            text = str(cause).strip()
            reason = text.splitlines()[0] if text else type(cause).__name__
            return "".join([reason, *(f" ({note})" for note in getattr(exc, "__notes__", ()))])
    return None


# SQLSTATEs of a session the server itself ended, or a connection failure it reported: the
# connection is gone, not the statement refused. A restart (`pg_ctl restart -m fast`), a failover
# or `pg_terminate_backend` ends every idle pooled session with 57P01; the next statement on one
# failed, so the first read, `/readyz` and webhook after every restart answered 503 (found by QA).
_SESSION_ENDED = ("57P01", "57P02")  # admin_shutdown, crash_shutdown
_CONNECTION_EXCEPTION_CLASS = "08"


def lost_connection(exc: BaseException) -> bool:
    """Whether `exc` comes from a PostgreSQL connection that broke under the statement (the
    server or the network closed it, or the server ended the session), rather than from the
    server refusing the statement (any other SQLSTATE) or from waiting for a connection that
    never came (a pool timeout: the database is down, or busy)."""
    for cause in _causes(exc):
        if isinstance(cause, psycopg.Error):
            if isinstance(cause, PoolTimeout):
                return False
            state = cause.sqlstate
            return (
                state is None
                or state in _SESSION_ENDED
                or state.startswith(_CONNECTION_EXCEPTION_CLASS)
            )
    return False


class AuditSqliteRecorder(SQLiteApplicationRecorder):
    """eventsourcing's SQLite recorder, also writing the owners that `owners=` names."""

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {OWNER_INDEX} {OWNER_INDEX_COLUMNS}",
        ]

    def _insert_events(
        self,
        c: SQLiteCursor,
        stored_events: Sequence[StoredEvent],
        *,
        owners: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Sequence[int] | None:
        positions = super()._insert_events(c, stored_events, **kwargs)
        if owners:
            c.executemany(
                f"INSERT INTO {OWNER_INDEX} (object_id, organization_id) VALUES (?, ?)"
                " ON CONFLICT (object_id) DO NOTHING",
                list(owners.items()),
            )
        return positions


class AuditPostgresRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder, appending in one round trip and without retries.

    The stock insert takes about ten round trips (BEGIN, lock timeout, LOCK TABLE, NOTIFY, the
    insert, COMMIT, through a pipeline) and dumps one array of a composite type, whose bytea
    psycopg escapes through a Python regex per field. Here one call to a server-side function does
    the same things in the same order, in one transaction: it takes the same EXCLUSIVE lock (so
    notification ids still commit in order), notifies the same channel, and inserts four plain
    arrays. (eventsourcing's own POSTGRES_ENABLE_DB_FUNCTIONS path skips the lock: not that one.)
    It also writes the owners that `owners=` names into the owner index.

    The stock recorder also retries a failed insert (and read) ten times with a connect timeout
    each: over a minute while the database is down, far past Svix's 15 s. We answer 503 after
    one try instead and let Svix (or the reader) retry.
    """

    def __init__(self, datastore: Any, *, events_table_name: str = "stored_events") -> None:
        # eventsourcing passes the pool no such options. The pool reads them on each connect,
        # and opens (connecting) in the stock recorder's constructor: so before it.
        datastore.pool.kwargs.update(TCP_LIVENESS)
        super().__init__(datastore, events_table_name=events_table_name)
        schema = pgsql.Identifier(datastore.schema)
        function = pgsql.Identifier(f"{events_table_name}_append")
        owner_index = pgsql.Identifier(datastore.schema, OWNER_INDEX)
        self.sql_create_statements += [
            pgsql.SQL("CREATE TABLE IF NOT EXISTS {owner_index} {columns}").format(
                owner_index=owner_index, columns=pgsql.SQL(OWNER_INDEX_COLUMNS)
            ),
            # Before it wrote owners too, the function took four arguments.
            pgsql.SQL(
                "DROP FUNCTION IF EXISTS {schema}.{function}(uuid[], bigint[], text[], bytea[])"
            ).format(schema=schema, function=function),
            pgsql.SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}("
                " ids uuid[], versions bigint[], topics text[], states bytea[],"
                " owned text[], owners text[])"
                " RETURNS TABLE (notification_id bigint) LANGUAGE plpgsql AS $$"
                " BEGIN"
                "  SET LOCAL lock_timeout = '{lock_timeout}s';"
                "  LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE;"
                "  NOTIFY {channel};"
                "  INSERT INTO {owner_index} (object_id, organization_id)"
                "   SELECT * FROM unnest(owned, owners) ON CONFLICT (object_id) DO NOTHING;"
                "  RETURN QUERY INSERT INTO {schema}.{table} AS t"
                "   (originator_id, originator_version, topic, state)"
                "   SELECT * FROM unnest(ids, versions, topics, states)"
                "   RETURNING t.notification_id;"
                " END $$"
            ).format(
                schema=schema,
                function=function,
                table=pgsql.Identifier(events_table_name),
                owner_index=owner_index,
                channel=pgsql.Identifier(self.channel_name),
                lock_timeout=pgsql.SQL(str(int(datastore.lock_timeout))),
            ),
        ]
        self.append_statement = pgsql.SQL(
            # Binary arrays: psycopg dumps a text array of bytea element by element in Python,
            # hex-escaping each state (0.56 ms of CPU for a batch of 21 events; binary 0.07).
            "SELECT notification_id FROM {schema}.{function}(%b, %b, %b, %b, %b, %b)"
        ).format(schema=schema, function=function)

    def insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        owners: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Sequence[int] | None:
        owners = owners or {}  # only ids `owner_index_holds`
        with self.datastore.get_connection() as conn, conn.cursor() as cursor:
            cursor.execute(
                self.append_statement,
                (
                    [event.originator_id for event in stored_events],
                    [event.originator_version for event in stored_events],
                    [event.topic for event in stored_events],
                    [event.state for event in stored_events],
                    list(owners),
                    list(owners.values()),
                ),
                prepare=True,
            )
            return [row["notification_id"] for row in cursor.fetchall()]

    # The stock read of a stream retries too: ten tries with the pool's wait each, about 32 s
    # before an `as_of` read answered 503 while the database was down.
    select_events = PostgresApplicationRecorder.select_events.__wrapped__  # type: ignore[attr-defined]


def eventsourcing_env(database: Database) -> dict[str, str]:
    """The environment eventsourcing reads to build its recorders for `database`."""
    if isinstance(database, SqliteDatabase):
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(database.path),
            "SQLITE_LOCK_TIMEOUT": str(SQLITE_LOCK_TIMEOUT_SECONDS),
            "APPLICATION_RECORDER_TOPIC": f"{__name__}:AuditSqliteRecorder",
        }
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": database.dbname,
        "POSTGRES_HOST": database.host,
        "POSTGRES_PORT": str(database.port),
        "POSTGRES_USER": database.user,
        "POSTGRES_PASSWORD": database.password,
        "POSTGRES_SCHEMA": database.schema,
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "8",
        "POSTGRES_CONNECT_TIMEOUT": str(CONNECTION_WAIT_SECONDS),
        "POSTGRES_LOCK_TIMEOUT": "10",
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "30",
        "APPLICATION_RECORDER_TOPIC": f"{__name__}:AuditPostgresRecorder",
    }


def prepare_database(database: Database) -> None:
    """Make sure the place the store will live in exists: a directory, or a PostgreSQL schema."""
    if isinstance(database, SqliteDatabase):
        database.path.parent.mkdir(parents=True, exist_ok=True)
        return
    with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(database.schema))
        )


def store_exists(database: Database) -> bool:
    """Whether a store was ever opened there: its events table, in the SQLite file or the
    PostgreSQL schema. Looked for without writing: a file or schema that holds something else
    (`public`, another application's database) is no store, and is left as it was."""
    if isinstance(database, SqliteDatabase):
        if not database.path.exists():
            return False
        # Opened read-only: another application's file is not touched.
        uri = f"{database.path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                [events_table_name("sqlite")],
            )
            return found.fetchone() is not None
    with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s",
            [database.schema, events_table_name("postgresql")],
        )
        return found.fetchone() is not None


@contextlib.contextmanager
def setup_lock(database: Database) -> Iterator[None]:
    """Processes starting together (uvicorn workers) create tables in turn, not at once.

    Concurrent `CREATE ... IF NOT EXISTS` and `CREATE OR REPLACE` still clash in PostgreSQL's
    catalog; SQLite serialises its writers already.
    """
    if not isinstance(database, PostgresDatabase):
        yield
        return
    with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(7303001)")
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(7303001)")


class LockHeld(Exception):
    """Another process holds the lock this one asked for."""


@contextmanager
def held_exclusively(database: Database, purpose: str) -> Iterator[None]:
    """Hold this store's lock for `purpose` for the block, or raise LockHeld at once when another
    process holds it. The lock goes with the process however it ends (`kill -9` included): a
    PostgreSQL session's advisory lock, an open file's flock beside the SQLite file.
    """
    if isinstance(database, SqliteDatabase):
        import fcntl  # POSIX; SQLite's own locks are fcntl ranges, which flock does not touch

        # Beside the file itself: another path to it (a symlink) takes the same lock.
        real = database.path.resolve()
        path = real.with_name(f"{real.name}-{purpose}.lock")
        with open(path, "a") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeld(purpose) from None
            yield
        return
    key = f"clerk-audit {database.schema} {purpose}"  # one store's, not the database's
    with psycopg.connect(**postgres_connect_args(database), autocommit=True) as conn:
        taken = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()
        if not (taken and taken[0]):
            raise LockHeld(purpose)
        yield  # closing the connection releases it


class AppendsFirst:
    """On SQLite, webhook appends go before projection steps for the write lock.

    Why: a step holds SQLite's one write lock for its whole batch and takes it again as soon as
    it commits, while an append waiting meanwhile sleeps in SQLite's busy handler (up to 100 ms
    a try) and seldom finds it free: during `audit rebuild --all` webhooks fell from 1,051/s
    to 46/s, with waits of up to 2.9 s (bench/busy_rebuild.py).

    Two flocks beside the store (they go with their process, however it ends):
    - an append holds `-appends.lock` shared for as long as it records, and a step waits until
      no append holds it, for at most `limit` seconds (under a constant stream of appends, the
      steps still take turns);
    - a step holds `-steps.lock` while it writes, and an append waits for a step under way on
      that lock (as long as SQLite's own lock timeout at most), so that it starts the moment
      the step commits rather than at its busy handler's next try.

    Each is a file opened read-only: any user who can read the store can take its locks. Where
    one cannot be opened (a directory no one may create it in), this process goes without.
    """

    POLL_SECONDS = 0.002

    def __init__(self, database: SqliteDatabase) -> None:
        real = database.path.resolve()  # another path to the file (a symlink) shares them
        self.appends_path = real.with_name(f"{real.name}-appends.lock")
        self.steps_path = real.with_name(f"{real.name}-steps.lock")
        self._lock = threading.Lock()
        self._appending = 0  # this process's appends under way (a flock is per open file)
        # Each use its own open file: flocks on one conflict only with those on others.
        self._files: dict[str, int | None] = {}

    def _file(self, use: str) -> int | None:
        """The descriptor for `use`, opened the first time; None if it cannot be. (Called
        holding `_lock`.)"""
        if use not in self._files:
            path = self.appends_path if use.startswith("append") else self.steps_path
            try:
                self._files[use] = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                logger.warning("%s: %s; webhooks and projection steps go unordered", path, exc)
                self._files[use] = None
        return self._files[use]

    @contextmanager
    def announced(self) -> Iterator[None]:
        """Around an append."""
        import fcntl  # POSIX, as SQLite's own locking of the file is

        with self._lock:
            appending, steps = self._file("appending"), self._file("steps seen by appends")
            if appending is not None and self._appending == 0:
                fcntl.flock(appending, fcntl.LOCK_SH)
            self._appending += 1
        try:
            if steps is not None:
                _poll_flock(steps, fcntl.LOCK_SH, SQLITE_LOCK_TIMEOUT_SECONDS)
                fcntl.flock(steps, fcntl.LOCK_UN)
            yield
        finally:
            with self._lock:
                self._appending -= 1
                if appending is not None and self._appending == 0:
                    fcntl.flock(appending, fcntl.LOCK_UN)

    @contextmanager
    def step(self, limit: float) -> Iterator[None]:
        """Around a projection step's transaction."""
        import fcntl

        with self._lock:
            appends, steps = self._file("appends seen by steps"), self._file("stepping")
        if appends is not None and _poll_flock(appends, fcntl.LOCK_EX, limit):
            fcntl.flock(appends, fcntl.LOCK_UN)
        if steps is not None:
            fcntl.flock(steps, fcntl.LOCK_EX)  # others hold it an instant, or for their step
        try:
            yield
        finally:
            if steps is not None:
                fcntl.flock(steps, fcntl.LOCK_UN)

    def close(self) -> None:
        for descriptor in self._files.values():
            if descriptor is not None:
                os.close(descriptor)
        self._files.clear()


def _poll_flock(descriptor: int, operation: int, limit: float) -> bool:
    """Take a flock, trying every AppendsFirst.POLL_SECONDS for up to `limit` seconds; whether
    it was taken."""
    import fcntl

    deadline = time.monotonic() + limit
    while True:
        try:
            fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(AppendsFirst.POLL_SECONDS)


def postgres_connect_args(database: PostgresDatabase) -> dict[str, Any]:
    return {
        "host": database.host,
        "port": database.port,
        "user": database.user,
        "password": database.password,
        "dbname": database.dbname,
        "connect_timeout": CONNECTION_WAIT_SECONDS,
        **TCP_LIVENESS,
    }


class Cursor(Protocol):
    def execute(self, statement: Any, params: Any = ...) -> Any: ...
    def executemany(self, statement: Any, params_seq: Any) -> Any: ...
    def fetchall(self) -> Any: ...
    def fetchone(self) -> Any: ...


_PLACEHOLDER = re.compile(r"%s")


class Db:
    """SQL access to the store's database through eventsourcing's own connection pool."""

    def __init__(
        self,
        datastore: Any,
        dialect: Dialect,
        schema: str,
        appends_first: AppendsFirst | None = None,
    ) -> None:
        self.datastore = datastore
        self.dialect = dialect
        self.appends_first = appends_first
        self.events_table = events_table_name(dialect)
        self.tracking_table = tracking_table_name(dialect)
        self.schema = schema
        if dialect == "postgresql":
            # eventsourcing builds the pool without this setting; the pool reads it per retry.
            datastore.pool.reconnect_timeout = RECONNECT_GIVE_UP_SECONDS

    @contextmanager
    def appending(self) -> Iterator[None]:
        """Around a webhook append: on SQLite, projection steps let it go first (AppendsFirst)."""
        if self.appends_first is None:
            yield
            return
        with self.appends_first.announced():
            yield

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Around a projection step's transaction: on SQLite, the appends announced go first,
        for up to APPENDS_FIRST_SECONDS. (PostgreSQL's appends do not wait for a step.)"""
        if self.appends_first is None:
            yield
            return
        with self.appends_first.step(APPENDS_FIRST_SECONDS):
            yield

    def close(self) -> None:
        if self.appends_first is not None:
            self.appends_first.close()

    def sql(self, statement: str) -> str:
        """Adapt a `%s`-placeholder statement to the dialect."""
        if self.dialect == "sqlite":
            return _PLACEHOLDER.sub("?", statement)
        return statement

    def any_of(self, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """A `%s`-placeholder condition, `column <it>`, for `column` being any of `values`,
        with its parameters: one array on PostgreSQL (one statement text whatever the count)."""
        if self.dialect == "postgresql":
            return "= ANY(%s)", [list(values)]
        return f"IN ({', '.join(['%s'] * len(values))})", list(values)

    def table(self, name: str) -> str:
        """A table name, qualified with the schema on PostgreSQL."""
        if self.dialect == "postgresql":
            return f'"{self.schema}"."{name}"'
        return f'"{name}"'

    def table_names(self, cursor: Cursor, prefix: str = "") -> list[str]:
        """The unqualified names of the tables in the store's schema (or SQLite file) that
        start with `prefix` (a generation's, a retired one's)."""
        if self.dialect == "postgresql":
            cursor.execute(
                "SELECT tablename AS name FROM pg_tables WHERE schemaname = %s", [self.schema]
            )
        else:
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return [row["name"] for row in cursor.fetchall() if row["name"].startswith(prefix)]

    def analyze(self, cursor: Cursor, table: str) -> None:
        """Gather the planner's statistics for a table (on SQLite from a sample, as PostgreSQL
        does, rather than by reading every row)."""
        if self.dialect == "sqlite":
            cursor.execute("PRAGMA analysis_limit = 1000")
        cursor.execute(f"ANALYZE {table}")

    def stream_key(self, stream: UUID) -> Any:
        """How an originator id is stored: hex text in SQLite, uuid in PostgreSQL."""
        return stream.hex if self.dialect == "sqlite" else stream

    @contextmanager
    def transaction(self, *, wait_for_flush: bool = True) -> Iterator[Cursor]:
        """A write transaction, committed on success. SQLite takes the write lock up front.

        `wait_for_flush=False` is for rows derived from the store and committed with the
        position they were derived up to (projection steps). On PostgreSQL the commit then
        returns before its WAL reaches disk (asynchronous commit): a server crash can lose the
        last such commits whole, rows and position together, and they are derived again.
        """
        with self.guarded():
            if self.dialect == "sqlite":
                with self.datastore.get_connection(commit=True) as conn:
                    cursor = conn.cursor()
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        yield cursor
                    except BaseException:
                        conn.rollback()
                        raise
                    conn.commit()
            else:
                with self.datastore.transaction(commit=True) as cursor:
                    if not wait_for_flush:
                        cursor.execute("SET LOCAL synchronous_commit = off")
                    yield cursor

    @contextmanager
    def reader(self) -> Iterator[Cursor]:
        """A cursor for reads (one consistent snapshot per statement)."""
        with self.guarded():
            if self.dialect == "sqlite":
                with self.datastore.get_connection(commit=False) as conn:
                    yield conn.cursor()
            else:
                with self.datastore.get_connection() as conn, conn.cursor() as cursor:
                    yield cursor

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Raise what says the database could not be used as StoreUnavailable (a 503, a
        retry), after dropping the pool's broken connections."""
        try:
            yield
        except UNAVAILABLE_ERRORS as exc:
            if is_statement_refused(exc):
                raise
            self.heal()
            raise StoreUnavailable(str(exc)) from exc

    def insert_rows(
        self,
        cursor: Cursor,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
        *,
        on_conflict: str = "",
    ) -> None:
        """INSERT many rows at once: `columns` are (name, PostgreSQL type) pairs.

        PostgreSQL: plain rows go by binary COPY, whose rows psycopg formats in C. Measured at
        500,000 `changes` rows, that took a fifth of the Python time and three quarters of the
        server time of one `INSERT ... SELECT FROM unnest(array, ...)` of binary arrays, which
        is still what an upsert (`on_conflict`) gets. Text columns are made safe first either
        way (`_text_safe_rows`; see `text_safe`). SQLite gets `executemany`, a loop in C.
        """
        if not rows:
            return
        names = ", ".join(name for name, _ in columns)
        if self.dialect == "sqlite":
            marks = ", ".join("?" for _ in columns)
            cursor.executemany(
                f"INSERT INTO {table} ({names}) VALUES ({marks}) {on_conflict}", rows
            )
            return
        rows = _text_safe_rows(columns, rows)
        raw = cursor.unwrapped if isinstance(cursor, _NulFreeCursor) else cursor
        if not on_conflict:
            with raw.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([kind for _, kind in columns])
                for row in rows:
                    copy.write_row(row)
            return
        # %b: binary arrays, whose elements need no quoting (the text format escapes every
        # quote of every JSON string with a regular expression).
        arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
        raw.execute(
            f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) {on_conflict}",
            [list(values) for values in zip(*rows, strict=True)],
        )

    def text_safe(self, cursor: Cursor) -> Cursor:
        """A cursor whose string parameters PostgreSQL's text type can hold.

        PostgreSQL text cannot contain NUL; a payload can (JSON's \\u0000). Read models store
        U+FFFD in its place. The event store keeps the delivery exactly as signed.
        """
        if self.dialect == "postgresql":
            return _NulFreeCursor(cursor)
        return cursor

    def heal(self) -> None:
        """After a lost connection, drop the pool's other broken ones now.

        Checking every connection on checkout (pre-ping) would cost a round trip per
        transaction; instead the first failure has the pool test its idle connections, so the
        requests after the database comes back do not trip over dead ones.
        """
        if self.dialect == "postgresql":
            with contextlib.suppress(Exception):
                self.datastore.pool.check()

    def once_more_if_lost(self, work: Callable[[], T]) -> T:
        """`work()`, run once more when it failed on a connection that had broken while idle in
        the pool.

        A database restart or failover cuts every pooled connection; without this, the first
        read or delivery after the database was back failed with 503 on each dead one. `heal`
        has dropped the rest by the time of the second try, which gets a live connection or a
        new one. Only for work that may run twice: a read, or recording deliveries (a svix-id
        is recorded once; a second try after a commit whose answer was lost says duplicate).
        """
        try:
            return work()
        except StoreUnavailable as exc:
            if self.dialect != "postgresql" or not lost_connection(exc):
                raise
        return work()

    def fetchall(
        self, statement: str, params: Sequence[Any] = (), *, payloads: bool = False
    ) -> list[Any]:
        """`payloads`: the rows carry stored events' payloads (see `fetch_payloads`)."""
        with self.reader() as cursor:
            if payloads:
                return self.fetch_payloads(cursor, statement, params)
            cursor.execute(self.sql(statement), self.bindable(params))
            return list(cursor.fetchall())

    def fetch_payloads(self, cursor: Cursor, statement: str, params: Sequence[Any]) -> list[Any]:
        """The rows of a read whose rows carry stored events' payloads (`state`, bytea).

        PostgreSQL sends them in binary: as text, the server hex-encodes every payload and
        psycopg decodes it again, which was half the time of reading a batch of them
        (bench/README.md). The rows' Python values are the same either way."""
        binary = {"binary": True} if self.dialect == "postgresql" else {}
        cursor.execute(self.sql(statement), self.bindable(params), **binary)
        return list(cursor.fetchall())

    def fetchone(self, statement: str, params: Sequence[Any] = ()) -> Any:
        with self.reader() as cursor:
            cursor.execute(self.sql(statement), self.bindable(params))
            return cursor.fetchone()

    def bindable(self, params: Sequence[Any]) -> list[Any]:
        """A read's parameters as the database can take them: PostgreSQL's text cannot hold a
        NUL, and its rows hold U+FFFD for one (`text_safe`), so a key read back from SQLite's
        rows, which keep the NUL, still finds its place in PostgreSQL's."""
        return _nul_free(list(params)) if self.dialect == "postgresql" else list(params)

    def ping(self) -> None:
        try:
            self.once_more_if_lost(lambda: self.fetchone("SELECT 1 AS one"))
        except PersistenceError as exc:
            raise StoreUnavailable(str(exc)) from exc

    # -- the events table ------------------------------------------------------------------

    def stored_records(self) -> int:
        """Every record in the store, deliveries and their markers: what a rebuild or `audit
        verify` reads. (Not the last position: positions have gaps, where a duplicate's append
        rolled back.)"""
        table = self.table(self.events_table)
        return self.fetchone(f"SELECT COUNT(*) AS records FROM {table}")["records"]

    @property
    def position_column(self) -> str:
        return "rowid" if self.dialect == "sqlite" else "notification_id"

    def position_of(self, stream: UUID, version: int) -> int | None:
        """The store position (notification id) of one stored event."""
        row = self.fetchone(
            f"SELECT {self.position_column} AS position FROM {self.table(self.events_table)} "
            "WHERE originator_id = %s AND originator_version = %s",
            (self.stream_key(stream), version),
        )
        return None if row is None else row["position"]

    def last_position(self, stream: UUID) -> int | None:
        """The store position of a stream's latest event; None if it has none."""
        row = self.fetchone(
            f"SELECT {self.position_column} AS position FROM {self.table(self.events_table)}"
            " WHERE originator_id = %s ORDER BY originator_version DESC LIMIT 1",
            (self.stream_key(stream),),
        )
        return None if row is None else row["position"]

    def last_versions(self, streams: Sequence[UUID]) -> dict[UUID, int]:
        """The highest stored version of each of these streams that has any event."""
        selected, params = self._streams_condition(streams)
        rows = self.fetchall(
            f"SELECT originator_id AS stream, MAX(originator_version) AS version"
            f" FROM {self.table(self.events_table)} WHERE originator_id {selected}"
            " GROUP BY originator_id",
            params,
        )
        return {UUID(str(row["stream"])): row["version"] for row in rows}

    def positions(self, streams: Sequence[UUID]) -> dict[tuple[UUID, int], int]:
        """The store position of every event of these streams, by (stream, version)."""
        selected, params = self._streams_condition(streams)
        rows = self.fetchall(
            f"SELECT originator_id AS stream, originator_version AS version,"
            f" {self.position_column} AS position"
            f" FROM {self.table(self.events_table)} WHERE originator_id {selected}",
            params,
        )
        return {(UUID(str(row["stream"])), row["version"]): row["position"] for row in rows}

    def _streams_condition(self, streams: Sequence[UUID]) -> tuple[str, list[Any]]:
        keys = [self.stream_key(stream) for stream in streams]
        if self.dialect == "postgresql":
            # One statement text whatever the count (psycopg prepares a repeated one); binary.
            return "= ANY(%b)", [keys]
        return f"IN ({','.join(['%s'] * len(keys))})", keys

    def owner_of(self, object_id: str) -> str | None:
        if not owner_index_holds(object_id):
            return None  # never written, and PostgreSQL would refuse to look for it
        row = self.fetchone(
            f"SELECT organization_id FROM {self.table(OWNER_INDEX)} WHERE object_id = %s",
            (object_id,),
        )
        return row["organization_id"] if row else None

    def _events_protected(self) -> bool:
        """Whether the events table's triggers (and, on PostgreSQL, the function they run, as
        this release writes it) are in place already."""
        if self.dialect == "sqlite":
            row = self.fetchone(
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'trigger'"
                " AND name IN ('events_refuse_update', 'events_refuse_delete')"
            )
            return row["n"] == 2
        row = self.fetchone(
            "SELECT (SELECT COUNT(*) FROM pg_trigger WHERE tgrelid = %s::regclass"
            " AND tgname IN ('events_refuse_change', 'events_refuse_truncate')"
            # A trigger disabled by hand is put back, as re-creating it on every start did.
            " AND tgenabled <> 'D') AS n,"
            " (SELECT prosrc FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace"
            " WHERE s.nspname = %s AND p.proname = 'refuse_event_change') AS body",
            [self.table(self.events_table), self.schema],
        )
        return row["n"] == 2 and row["body"] == _REFUSE_EVENT_CHANGE

    def protect_events_table(self) -> None:
        """Make the events table refuse UPDATE and DELETE in the database itself.

        Only where that is not done yet: creating the triggers takes a lock that waits for every
        write under way (SQLite's writer lock; on PostgreSQL, a lock that conflicts with an
        insert's), so `audit projections` and `audit show` waited on a busy store, and failed
        after 30 s on one held by a long transaction."""
        if self._events_protected():
            return
        table = self.table(self.events_table)
        with self.transaction() as cursor:
            if self.dialect == "sqlite":
                for operation in ("UPDATE", "DELETE"):
                    cursor.execute(
                        f"CREATE TRIGGER IF NOT EXISTS events_refuse_{operation.lower()} "
                        f"BEFORE {operation} ON {table} "
                        "BEGIN SELECT RAISE(ABORT, 'clerk-audit events are immutable'); END"
                    )
                return
            function = f'"{self.schema}"."refuse_event_change"'
            cursor.execute(
                f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql"
                f" AS $${_REFUSE_EVENT_CHANGE}$$"
            )
            cursor.execute(
                "CREATE OR REPLACE TRIGGER events_refuse_change"
                f" BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {function}()"
            )
            cursor.execute(
                f"CREATE OR REPLACE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            )


# The body of the function the events table's PostgreSQL triggers run.
_REFUSE_EVENT_CHANGE = (
    " BEGIN RAISE EXCEPTION 'clerk-audit events are immutable: % refused', TG_OP; END "
)


class EventWaiter:
    """Waits for new events: a NOTIFY on PostgreSQL (polling as the backstop), a poll on SQLite."""

    def __init__(self, database: Database, channel: str) -> None:
        self.database = database
        self.channel = channel
        self._conn: psycopg.Connection[Any] | None = None

    def __call__(self, stop: threading.Event, timeout: float) -> None:
        if not isinstance(self.database, PostgresDatabase):
            stop.wait(timeout)
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    **postgres_connect_args(self.database), autocommit=True
                )
                self._conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(self.channel)))
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error:
            self.close()
            stop.wait(timeout)  # a lost NOTIFY connection must not stall: poll instead

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


def _nul_free(params: Any) -> Any:
    """Parameters with U+FFFD for NUL in every string, arrays' elements included."""
    if isinstance(params, (list, tuple)):
        return [_nul_free_value(value) for value in params]
    return params


def _nul_free_value(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):  # an array parameter: its scalars, inlined
        return [
            item.replace("\x00", "\ufffd") if type(item) is str and "\x00" in item else item
            for item in value
        ]
    return value


def _text_safe_rows(
    columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]
) -> Sequence[Sequence[Any]]:
    """`rows` as PostgreSQL text columns can take them: U+FFFD for NUL in every string, and a
    value of another type in a text column (a payload's `"status": 5`) as its `str`, which the
    cast of the earlier array INSERT also gave and which COPY would refuse. Both are rare: one
    join of each text column finds whether there is any, and only then is every value looked at.
    """
    text = [kind == "text" for _, kind in columns]
    for is_text, values in zip(text, zip(*rows, strict=True), strict=True):
        if not is_text:
            continue
        try:
            clean = "\x00" not in "".join(filter(None, values))
        except TypeError:  # a value that is not a string
            clean = False
        if not clean:
            return [
                [
                    _nul_free_value(value if type(value) is str else str(value))
                    if is_text_column and value is not None
                    else value
                    for is_text_column, value in zip(text, row, strict=True)
                ]
                for row in rows
            ]
    return rows


class _NulFreeCursor:
    def __init__(self, cursor: Cursor) -> None:
        self.unwrapped = cursor

    def execute(self, statement: Any, params: Any = None) -> Any:
        return self.unwrapped.execute(statement, _nul_free(params))

    def executemany(self, statement: Any, params_seq: Any) -> Any:
        return self.unwrapped.executemany(statement, [_nul_free(p) for p in params_seq])

    def fetchall(self) -> Any:
        return self.unwrapped.fetchall()

    def fetchone(self) -> Any:
        return self.unwrapped.fetchone()


def events_table_name(dialect: Dialect) -> str:
    return "stored_events" if dialect == "sqlite" else f"{APPLICATION_NAME}_events"


def tracking_table_name(dialect: Dialect) -> str:
    """Where projections record their positions (eventsourcing's tracking recorder's table)."""
    return "tracking" if dialect == "sqlite" else f"{APPLICATION_NAME}_tracking"


def dialect_of(database: Database) -> Dialect:
    return "sqlite" if isinstance(database, SqliteDatabase) else "postgresql"
