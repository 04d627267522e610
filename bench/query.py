"""Read API benchmark (issues 5 and 6): latency of the main `/v1` routes over a large store.

    python bench/query.py --events 200000 --clients 8 --requests 2000

Set-up builds a PostgreSQL store of N generated deliveries (bench/store_fill.py: COPY of the rows
`AuditLog.record` would write, then the service's own `Projector.run_once`), starts `audit serve`
as users would, and from this process (C threads, each with its own keep-alive httpx.Client, or
with `--client raw` a bare socket) requests each route R times with ids sampled from the store.
One `query ...` line per route.
`--explain` prints EXPLAIN ANALYZE of the SQL each route runs (captured from `audit.queries`);
`--py-spy DIR` profiles the server during each route. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import httpx
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.store_fill

from audit import queries
from audit.application import AuditLog
from audit.config import PostgresDatabase, SqliteDatabase, parse_database_url
from audit.queries import ChangeFilters, EventFilters, TypeFilter
from audit.storage import events_table_name
from bench.procstat import machine_busy_seconds, read_stat
from bench.serverproc import ServerProcess, audit_command, free_port
from bench.store_fill import World, bulk_load, project, project_parallel

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
TOKEN = "benchtoken"
TARGET_MS = 20.0
CORES = os.cpu_count() or 1
SAMPLE_SIZE = 2000  # ids of each kind drawn from the store
WARMUP_PER_ROUTE = 50
PROJECTION_GROUPS = (("objects",), ("events", "timelines"))


# -- the routes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ids:
    users: list[str]
    sessions: list[str]
    orgs: list[str]
    as_of: list[tuple[str, int]]  # a user and a time between its first and last version
    times: list[int]  # between the stream's first and last occurred_at
    addresses: list[str]  # IPv4 actors' addresses (`store_fill.World.client_ip`)


@dataclass(frozen=True)
class RouteSpec:
    name: str
    make: Callable[[random.Random, Ids], str]  # a request path
    target: bool = False  # issue 6: p99 under 20 ms


def _pick(rng: random.Random, values: Sequence[Any]) -> Any:
    return values[rng.randrange(len(values))]


ROUTES: tuple[RouteSpec, ...] = (
    # The floor: no token check, no thread pool, no database; uvicorn, Starlette and the client.
    RouteSpec("/healthz", lambda r, i: "/healthz"),
    RouteSpec("/v1/users/{id}", lambda r, i: f"/v1/users/{_pick(r, i.users)}", target=True),
    RouteSpec(
        "/v1/users/{id}/history",
        lambda r, i: f"/v1/users/{_pick(r, i.users)}/history",
        target=True,
    ),
    RouteSpec(
        "/v1/sessions/{id}/timeline",
        lambda r, i: f"/v1/sessions/{_pick(r, i.sessions)}/timeline",
        target=True,
    ),
    RouteSpec("/v1/changes?field=first_name", lambda r, i: "/v1/changes?field=first_name", True),
    # The paths under a field (`objects` v14): a few (`public_metadata.department`), each a
    # branch of the field's index; and many (each address's), one range of it.
    RouteSpec(
        "/v1/changes?field=public_metadata", lambda r, i: "/v1/changes?field=public_metadata"
    ),
    RouteSpec(
        "/v1/changes?field=email_addresses", lambda r, i: "/v1/changes?field=email_addresses"
    ),
    RouteSpec(
        "/v1/changes?subject={user}", lambda r, i: f"/v1/changes?subject={_pick(r, i.users)}"
    ),
    RouteSpec("/v1/changes?type=user.updated", lambda r, i: "/v1/changes?type=user.updated"),
    RouteSpec("/v1/events?subject={user}", lambda r, i: f"/v1/events?subject={_pick(r, i.users)}"),
    RouteSpec(
        "/v1/organizations/{id}/members",
        lambda r, i: f"/v1/organizations/{_pick(r, i.orgs)}/members",
    ),
    # `actor_ip=`: one address (its key's index drives), and networks (`objects` v16), which
    # filter the walk in store order: common (`10.0.0.0/8`, 90% of the actors), about 3,500
    # events (`/16`) and about 14 (`/24`) at 1,000,000.
    RouteSpec(
        "/v1/changes?actor_ip={address}",
        lambda r, i: f"/v1/changes?actor_ip={_pick(r, i.addresses)}",
    ),
    RouteSpec("/v1/changes?actor_ip=10.0.0.0/8", lambda r, i: "/v1/changes?actor_ip=10.0.0.0/8"),
    RouteSpec(
        "/v1/changes?actor_ip={/16}",
        lambda r, i: f"/v1/changes?actor_ip={_network(_pick(r, i.addresses), 2)}",
    ),
    RouteSpec(
        "/v1/changes?actor_ip={/24}",
        lambda r, i: f"/v1/changes?actor_ip={_network(_pick(r, i.addresses), 3)}",
    ),
    RouteSpec("/v1/users/{id}?as_of={time}", lambda r, i: _as_of_path(_pick(r, i.as_of))),
    RouteSpec("/v1/events?since={time}", lambda r, i: f"/v1/events?since={_pick(r, i.times)}"),
    RouteSpec(
        "/v1/changes?field=first_name&since={time}",
        lambda r, i: f"/v1/changes?field=first_name&since={_pick(r, i.times)}",
    ),
)


def _as_of_path(pair: tuple[str, int]) -> str:
    user, when = pair
    return f"/v1/users/{user}?as_of={when}"


# -- the store ----------------------------------------------------------------------------------


def connect(database: PostgresDatabase, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=database.host,
        port=database.port,
        user=database.user,
        password=database.password,
        dbname=database.dbname,
        **kwargs,
    )


class BenchStore:
    """The store the routes read, for the benchmark's own look at it: a PostgreSQL schema or a
    SQLite file. Statements are written with `%s` placeholders and plain SQL both accept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.database = parse_database_url(url)

    @property
    def name(self) -> str:
        if isinstance(self.database, PostgresDatabase):
            return f"schema {self.database.schema}"
        return f"file {self.database.path}"

    def _qualified(self, table: str) -> str:
        if isinstance(self.database, PostgresDatabase):
            return f'"{self.database.schema}"."{table}"'
        return f'"{table}"'

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if isinstance(self.database, PostgresDatabase):
            with connect(self.database) as conn:
                return [tuple(row) for row in conn.execute(statement, params).fetchall()]
        assert isinstance(self.database, SqliteDatabase)
        conn = sqlite3.connect(self.database.path)
        try:
            return conn.execute(statement.replace("%s", "?"), params).fetchall()
        finally:
            conn.close()

    def exists(self) -> bool:
        if isinstance(self.database, SqliteDatabase) and not self.database.path.exists():
            return False
        if isinstance(self.database, PostgresDatabase):
            found = self.query(
                "SELECT 1 FROM information_schema.tables"
                " WHERE table_schema = %s AND table_name = 'projection_registry'",
                [self.database.schema],
            )
        else:
            found = self.query("SELECT 1 FROM sqlite_master WHERE name = 'projection_registry'")
        return bool(found)

    def table(self, projection: str, table: str) -> str:
        """The live generation's table."""
        rows = self.query(
            f"SELECT generation FROM {self._qualified('projection_registry')} WHERE name = %s",
            [projection],
        )
        assert rows, f"projection {projection} is not registered"
        return self._qualified(f"p_{projection}_g{rows[0][0]}_{table}")

    def events_table(self) -> str:
        dialect = "postgresql" if isinstance(self.database, PostgresDatabase) else "sqlite"
        return self._qualified(events_table_name(dialect))

    def analyze(self) -> None:
        """Statistics, as autovacuum would have gathered them on a store this old."""
        if isinstance(self.database, PostgresDatabase):
            with connect(self.database, autocommit=True) as conn:
                conn.execute(sql.SQL("ANALYZE"))
        else:
            self.query("ANALYZE")


def build_store(store: BenchStore, events: int, seed: int) -> None:
    log = AuditLog(store.database)
    try:
        started = time.perf_counter()
        rows = bulk_load(log, World(events, seed))
        loaded = time.perf_counter() - started
        print(
            f"setup step=load events={events} rows={rows} seconds={loaded:.1f}"
            f" rate={events / loaded:.0f}/s",
            flush=True,
        )
        started = time.perf_counter()
        if isinstance(store.database, PostgresDatabase):
            project_parallel(store.url, PROJECTION_GROUPS)
        else:  # one writer at a time: the processes would only take turns
            project(log)
        projected = time.perf_counter() - started
    finally:
        log.close()
    store.analyze()
    print(
        f"setup step=project events={events} seconds={projected:.1f}"
        f" rate={events / projected:.0f}/s",
        flush=True,
    )


def store_summary(store: BenchStore) -> str:
    """Row counts of the tables the routes read."""
    events = store.query(
        f"SELECT COUNT(*) FROM {store.events_table()} WHERE topic <> %s",
        ["clerk-audit:DeliveryMarker.Created"],
    )
    counts = [f"stored_deliveries={events[0][0]}"]
    for projection, table in (
        ("events", "event_subjects"),
        ("objects", "users"),
        ("objects", "sessions"),
        ("objects", "organizations"),
        ("objects", "memberships"),
        ("objects", "history"),
        ("objects", "changes"),
        ("timelines", "session_events"),
    ):
        found = store.query(f"SELECT COUNT(*) FROM {store.table(projection, table)}")
        counts.append(f"{table}={found[0][0]}")
    return " ".join(counts)


def sample_ids(store: BenchStore, seed: int) -> Ids:
    """Ids of live objects drawn at random from the read models (the same for every run with the
    same seed and store, on either backend)."""
    rng = random.Random(seed)

    def ids(table: str, where: str) -> list[str]:
        rows = store.query(f"SELECT id FROM {table} WHERE {where} ORDER BY id")
        found = [row[0] for row in rows]
        return rng.sample(found, min(SAMPLE_SIZE, len(found)))

    users = ids(store.table("objects", "users"), "deleted = 0")
    sessions = ids(store.table("objects", "sessions"), "1 = 1")
    members = store.table("objects", "memberships")
    organizations = store.table("objects", "organizations")
    orgs = ids(
        organizations,
        f"deleted = 0 AND EXISTS (SELECT 1 FROM {members} m"
        f" WHERE m.owner_id = {organizations}.id AND m.deleted = 0)",
    )
    history = store.table("objects", "history")
    marks = ", ".join("%s" for _ in users)
    spans = store.query(
        f"SELECT object_id, MIN(occurred_at), MAX(occurred_at) FROM {history}"
        f" WHERE object_id IN ({marks}) GROUP BY object_id ORDER BY object_id",
        users,
    )
    earliest, latest = store.query(f"SELECT MIN(occurred_at), MAX(occurred_at) FROM {history}")[0]
    as_of = [(user, rng.randint(first, last)) for user, first, last in spans if first is not None]
    times = [rng.randint(earliest or 0, latest or 0) for _ in range(SAMPLE_SIZE)]
    rows = store.query(
        f"SELECT actor_ip FROM {history} WHERE actor_ip LIKE '10.%%'"
        f" ORDER BY position LIMIT {SAMPLE_SIZE * 10}"
    )
    found = sorted({row[0] for row in rows})
    addresses = rng.sample(found, min(SAMPLE_SIZE, len(found)))
    return Ids(users, sessions, orgs, as_of, times, addresses)


def _network(address: str, octets: int) -> str:
    """The network of an IPv4 address's first `octets` octets, in CIDR notation."""
    kept = address.split(".")[:octets]
    return ".".join(kept + ["0"] * (4 - octets)) + f"/{8 * octets}"


def drop_store(store: BenchStore, postgres: str) -> None:
    if isinstance(store.database, PostgresDatabase):
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(store.database.schema)
                )
            )
    else:
        shutil.rmtree(store.database.path.parent, ignore_errors=True)


# -- the server ---------------------------------------------------------------------------------


def start_server(url: str, log: IO[bytes], workers: int = 1) -> ServerProcess:
    """`audit serve` as users start it, on a free port, with a fresh secret."""
    port = free_port()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    env = {
        **os.environ,
        "CLERK_WEBHOOK_SIGNING_SECRET": secret,
        "AUDIT_API_TOKENS": TOKEN,
        "AUDIT_DATABASE_URL": url,
    }
    command = [*audit_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    return ServerProcess("audit serve", command, env, port, log)


class PostgresBackends:
    """CPU of the PostgreSQL backends serving one schema (those whose last query names it)."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.conn = connect(database, autocommit=True)
        self.pattern = f'%"{database.schema}".%'

    def pids(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            [self.pattern],
        ).fetchall()
        return [row[0] for row in rows]

    def snapshot(self) -> dict[int, float]:
        return {pid: stat.cpu_seconds for pid in self.pids() if (stat := read_stat(pid))}

    def since(self, before: dict[int, float]) -> float:
        after = self.snapshot()
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

    def close(self) -> None:
        self.conn.close()


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)
    body_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    cpu_server: float = 0.0
    cpu_postgres: float = 0.0
    cpu_client: float = 0.0
    cpu_other: float = 0.0  # busy CPU of everything else on the machine

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class RawResponse:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class RawClient:
    """GET over one keep-alive HTTP/1.1 connection on a bare socket.

    The client's threads share the machine's two cores with the server and PostgreSQL, and one
    GIL among themselves: httpx spends about 0.5 ms of this process's CPU a request, and a
    response that arrives while another thread holds the GIL waits, which the latency then
    counts. This client does no more than the server needs (the answers must carry a
    Content-Length, as the JSON routes' do).
    """

    def __init__(self, base: str, headers: dict[str, str], timeout: float = 30) -> None:
        url = urlsplit(base)
        self.address = (url.hostname or "127.0.0.1", url.port or 80)
        fields = {"Host": url.netloc, **headers}
        self.head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock, self.buffer = None, b""

    def get(self, path: str) -> RawResponse:
        try:
            return self._get(path)
        except BaseException:
            self.close()  # the connection's state is unknown: start the next request afresh
            raise

    def _get(self, path: str) -> RawResponse:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode())
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        length = None
        for line in header_lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise OSError(f"no Content-Length in the answer to {path}")
        return RawResponse(int(status_line.split()[1]), self._read_exactly(length))

    def _read_until(self, end: bytes) -> bytes:
        while (found := self.buffer.find(end)) < 0:
            self._receive()
        head, self.buffer = self.buffer[:found], self.buffer[found + len(end) :]
        return head

    def _read_exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._receive()
        body, self.buffer = self.buffer[:count], self.buffer[count:]
        return body

    def _receive(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(262144)
        if not chunk:
            raise OSError("the server closed the connection")
        self.buffer += chunk


def client_loop(client: httpx.Client | RawClient, paths: Iterator[str], result: Result) -> None:
    for path in paths:
        started = time.perf_counter()
        try:
            response = client.get(path)
        except (httpx.HTTPError, OSError) as exc:
            result.statuses[type(exc).__name__] += 1
            if len(result.errors) < 3:
                result.errors.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        result.latencies.append(time.perf_counter() - started)
        result.statuses[response.status_code] += 1
        result.body_bytes += len(response.content)
        if response.status_code != 200 and len(result.errors) < 3:
            result.errors.append(f"{path}: {response.status_code} {response.text[:200]}")


def run_route(
    clients: Sequence[httpx.Client | RawClient],
    paths: list[str],
    server: ServerProcess,
    backends: PostgresBackends | None,
) -> Result:
    """Send `paths` from every client at once (a shared queue); measure each request."""
    pending = iter(paths)
    lock = threading.Lock()

    def next_path() -> Iterator[str]:
        while True:
            with lock:
                path = next(pending, None)
            if path is None:
                return
            yield path

    results = [Result() for _ in clients]
    cpu_server = server.cpu_seconds()
    cpu_postgres = backends.snapshot() if backends is not None else {}
    cpu_client, cpu_machine = time.process_time(), machine_busy_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(clients), thread_name_prefix="client") as pool:
        futures = [
            pool.submit(client_loop, client, next_path(), result)
            for client, result in zip(clients, results, strict=True)
        ]
        for future in futures:
            future.result()
    total = Result(elapsed=time.perf_counter() - started)
    total.cpu_client = time.process_time() - cpu_client
    total.cpu_server = server.cpu_seconds() - cpu_server
    total.cpu_postgres = backends.since(cpu_postgres) if backends is not None else 0.0
    ours = total.cpu_client + total.cpu_server + total.cpu_postgres
    total.cpu_other = max(0.0, machine_busy_seconds() - cpu_machine - ours)
    for result in results:
        total.latencies += result.latencies
        total.statuses += result.statuses
        total.body_bytes += result.body_bytes
        total.errors += result.errors
    return total


def format_statuses(counts: Counter[Any]) -> str:
    return "{" + ", ".join(f"{key}: {counts[key]}" for key in sorted(counts, key=str)) + "}"


def report_line(
    route: RouteSpec,
    events: int,
    clients: int,
    result: Result,
    client: str = "httpx",
    backend: str = "postgres",
) -> str:
    count = len(result.latencies) or 1
    client_note = "" if client == "httpx" else f" http_client={client}"
    p99 = result.percentile_ms(0.99)
    line = (
        f"query backend={backend} route={route.name} events={events} clients={clients}"
        f"{client_note}"
        f" requests={sum(result.statuses.values())}"
        f" p50={result.percentile_ms(0.50):.1f}ms p99={p99:.1f}ms"
        f" max={1000 * max(result.latencies, default=float('nan')):.1f}ms"
        f" rps={count / result.elapsed:.0f} statuses={format_statuses(result.statuses)}"
        f" body={result.body_bytes / count / 1024:.1f}KiB"
        f" cpu_per_request: server={1000 * result.cpu_server / count:.2f}ms"
        f" postgres={1000 * result.cpu_postgres / count:.2f}ms"
        f" client={1000 * result.cpu_client / count:.2f}ms"
        f" other_load={100 * result.cpu_other / (result.elapsed * CORES):.0f}%"
    )
    if route.target:
        line += f" target=p99<{TARGET_MS:.0f}ms:{'ok' if p99 < TARGET_MS else 'MISSED'}"
    return line


# -- profiles and plans ------------------------------------------------------------------------


class PySpy:
    """`py-spy record` of the server process for the duration of one route."""

    def __init__(self, folder: Path, name: str, pid: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        self.path = folder / f"{slug}.txt"
        self.process = subprocess.Popen(
            [
                *(py_spy_command(), "record", "--format", "raw", "--rate", "250", "--gil"),
                *("--subprocesses", "--nonblocking", "--output", str(self.path), "--pid", str(pid)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attach before the load starts

    def stop(self, top: int = 12) -> list[str]:
        self.process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        return summarize_collapsed(self.path, top) if self.path.exists() else []


def py_spy_command() -> str:
    script = Path(sys.executable).parent / "py-spy"
    return str(script) if script.exists() else "py-spy"


def summarize_collapsed(path: Path, top: int) -> list[str]:
    """Where the server's GIL time went (py-spy `--gil` samples one thread only while it holds
    the GIL): the busiest functions, inclusive and self, as shares of all samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function(frame) for frame in stack.split(";")]
        for frame in dict.fromkeys(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    share = 100 / max(total, 1)
    lines = [f"  py-spy --gil samples={total} file={path}"]
    busy = [(f, n) for f, n in inclusive.most_common() if n * share < 90][:top]
    lines += [f"  incl {n * share:5.1f}% {f}" for f, n in busy]
    lines += [f"  self {n * share:5.1f}% {f}" for f, n in own.most_common(top)]
    return lines


def _function(frame: str) -> str:
    """`name (path/file.py:line)` -> `name (dir/file.py)`."""
    name, _, location = frame.partition(" (")
    location = location.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(location.split('/')[-2:])})" if location else name


class RecordingDb:
    """Stands in for `audit.storage.Db` to capture the SQL a query function runs."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.dialect = db.dialect
        self.statements: list[tuple[str, list[Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        self.statements.append((statement, list(params)))
        return self.db.fetchall(statement, params)

    def fetchone(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self.statements.append((statement, list(params)))
        return self.db.fetchone(statement, params)


class RecordingLog:
    """The application with a `RecordingDb` (the events routes also decode stored payloads)."""

    def __init__(self, log: AuditLog, db: RecordingDb) -> None:
        self.log = log
        self.db = db

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)


def explain_routes(url: str, ids: Ids) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the statements each route runs, for one sampled id."""
    database = parse_database_url(url)
    assert isinstance(database, PostgresDatabase)
    log = AuditLog(database)
    user, session, org = ids.users[0], ids.sessions[0], ids.orgs[0]
    calls: list[tuple[str, Callable[[Any], Any]]] = [
        ("/v1/users/{id}", lambda db: queries.current_object(db, "users", user)),
        (
            "/v1/users/{id}/history",
            lambda db: queries.history_page(
                db, by="object_id", clerk_id=user, after=None, limit=50
            ),
        ),
        (
            "/v1/sessions/{id}/timeline",
            lambda db: queries.session_timeline(db, session, after=None, limit=50),
        ),
        (
            "/v1/changes?field=first_name",
            lambda db: queries.changes_page(
                db, ChangeFilters(fields=("first_name",)), after=None, limit=50
            ),
        ),
        (
            "/v1/changes?subject={user}",
            lambda db: queries.changes_page(db, ChangeFilters(subject=user), after=None, limit=50),
        ),
        (
            "/v1/changes?type=user.updated",
            lambda db: queries.changes_page(
                db, ChangeFilters(types=TypeFilter.parse(["user.updated"])), after=None, limit=50
            ),
        ),
        (
            "/v1/events?subject={user}",
            lambda db: queries.events_page(
                RecordingLog(log, db), EventFilters(subject=user), after=None, limit=50
            ),
        ),
        (
            "/v1/events?since={time}",
            lambda db: queries.events_page(
                RecordingLog(log, db), EventFilters(since=ids.times[0]), after=None, limit=50
            ),
        ),
        (
            "/v1/changes?field=first_name&since={time}",
            lambda db: queries.changes_page(
                db, ChangeFilters(fields=("first_name",), since=ids.times[0]), after=None, limit=50
            ),
        ),
        (
            "/v1/organizations/{id}/members",
            lambda db: queries.owned_objects(
                db,
                "memberships",
                by="owner_id",
                owner=org,
                after=None,
                limit=50,
                include_deleted=False,
            ),
        ),
    ]
    try:
        with connect(database, row_factory=dict_row) as conn:
            for name, call in calls:
                recorder = RecordingDb(log.db)
                call(recorder)
                print(f"explain route={name}")
                for statement, params in recorder.statements:
                    print(f"  -- {statement}")
                    for _ in range(2):  # the second run is the warm one shown
                        plan = conn.execute(
                            f"EXPLAIN (ANALYZE, BUFFERS) {statement}", params
                        ).fetchall()
                    for row in plan:
                        print(f"  {row['QUERY PLAN']}")
    finally:
        log.close()


# -- main ---------------------------------------------------------------------------------------


def client_counts(value: str) -> list[int]:
    counts = [int(part) for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers, e.g. 8 or 1,8")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--clients", type=client_counts, default=[8], help="concurrent clients; a list runs each"
    )
    parser.add_argument("--requests", type=int, default=2_000, help="per route")
    parser.add_argument("--workers", type=int, default=1, help="`audit serve --workers`")
    parser.add_argument(
        "--client",
        choices=["httpx", "raw"],
        default="httpx",
        help="each client thread's HTTP client: httpx, or a bare keep-alive socket (cheaper)",
    )
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--schema", help="use (and keep) this schema; built when missing")
    parser.add_argument(
        "--sqlite", type=Path, metavar="FILE", help="use (and keep) this file; built when missing"
    )
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--routes", help="only routes whose name contains one of these (comma)")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE each route")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="profile the server per route")
    return parser.parse_args(argv)


def store_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The store's URL, and whether to keep it afterwards (a named store is kept and reused)."""
    if args.backend == "sqlite":
        if args.sqlite is not None:
            return f"sqlite:///{args.sqlite.resolve()}", True
        folder = Path(tempfile.mkdtemp(prefix="bench_q_"))
        return f"sqlite:///{folder / 'audit.db'}", args.keep
    schema = args.schema or f"bench_q_{secrets.token_hex(4)}"
    return f"{args.postgres}?schema={quote(schema)}", args.keep or args.schema is not None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.explain and args.backend != "postgres":
        raise SystemExit("--explain shows PostgreSQL's plans: use it with --backend postgres")
    url, keep = store_url(args)
    store = BenchStore(url)
    routes = [
        route
        for route in ROUTES
        if not args.routes or any(part in route.name for part in args.routes.split(","))
    ]
    failures = 0
    try:
        if store.exists():
            print(f"# reusing {store.name}", flush=True)
        else:
            build_store(store, args.events, args.seed)
        print(f"store {store_summary(store)}", flush=True)
        ids = sample_ids(store, args.seed)
        if args.explain:
            explain_routes(url, ids)
        with tempfile.NamedTemporaryFile(prefix="bench_query_", suffix=".log") as server_log:
            server = start_server(url, server_log, args.workers)
            try:
                ready = server.wait_ready("/readyz")
                print(f"server ready_seconds={ready:.1f} base={server.base}", flush=True)
                failures += run_all(args, server, store, routes, ids)
                for problem in server.problems():
                    print(f"  server: {problem}")
            finally:
                server.stop()
    finally:
        if not keep:
            drop_store(store, args.postgres)
    return 1 if failures else 0


def run_all(
    args: argparse.Namespace,
    server: ServerProcess,
    store: BenchStore,
    routes: list[RouteSpec],
    ids: Ids,
) -> int:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    # On SQLite the queries run in the server's own processes, which `cpu_server` counts.
    backends = (
        PostgresBackends(store.database) if isinstance(store.database, PostgresDatabase) else None
    )
    try:
        return _run_all(args, server, routes, ids, backends, rng, headers)
    finally:
        if backends is not None:
            backends.close()


def _run_all(
    args: argparse.Namespace,
    server: ServerProcess,
    routes: list[RouteSpec],
    ids: Ids,
    backends: PostgresBackends | None,
    rng: random.Random,
    headers: dict[str, str],
) -> int:
    failures = 0
    for count in args.clients:
        with contextlib.ExitStack() as stack:
            clients: list[httpx.Client | RawClient] = [
                stack.enter_context(
                    RawClient(server.base, headers)
                    if args.client == "raw"
                    else httpx.Client(base_url=server.base, headers=headers, timeout=30)
                )
                for _ in range(count)
            ]
            warmup = [route.make(rng, ids) for route in routes for _ in range(WARMUP_PER_ROUTE)]
            run_route(clients, warmup, server, backends)
            for route in routes:
                paths = [route.make(rng, ids) for _ in range(args.requests)]
                spy = None
                if args.py_spy:
                    spy = PySpy(args.py_spy / f"c{count}", route.name, server.process.pid)
                result = run_route(clients, paths, server, backends)
                line = report_line(route, args.events, count, result, args.client, args.backend)
                print(line, flush=True)
                if spy is not None:
                    for line in spy.stop():
                        print(line)
                for error in result.errors:
                    print(f"  error: {error}")
                failures += sum(n for status, n in result.statuses.items() if status != 200)
    return failures


if __name__ == "__main__":
    sys.exit(main())
