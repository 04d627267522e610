"""Webhook ingest benchmark: `audit serve` against the receiver a team would write from the guide.

This script is the load generator; each server runs as a subprocess on a loopback port and gets a
fresh store (a PostgreSQL schema or a SQLite file) for every run. See bench/README.md.

    python bench/ingest.py --backend postgres --deliveries 3000 --clients 1,32
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.serverproc

from audit.samples import sample_bodies, signed_headers
from bench.procstat import PostgresProcesses, command_line, machine_busy_seconds, tree
from bench.serverproc import ServerProcess, audit_command, free_port
from bench.store_fill import World

Backend = Literal["sqlite", "postgres"]
ServerName = Literal["ours", "baseline"]

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
WEBHOOK_PATH = "/webhooks/clerk"
API_TOKEN = "benchtoken"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CLERK_ID = re.compile(r"^([a-z]+(?:_[a-z]+)*)_[A-Za-z0-9]{27}$")
KEPT_PREFIXES = ("ins",)  # one Clerk instance sends everything
MARKER_TOPIC = "clerk-audit:DeliveryMarker.Created"
DELIVERY_TOPICS = ("User.", "Organization.", "Subject.")


# -- the deliveries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    svix_id: str
    body: bytes


@dataclass
class IdFactory:
    """Clerk-shaped ids: users and organizations from fixed pools, everything else fresh."""

    rng: random.Random
    users: list[str]
    orgs: list[str]

    @classmethod
    def create(cls, rng: random.Random, users: int, orgs: int) -> IdFactory:
        factory = cls(rng, [], [])
        factory.users = [factory.fresh("user") for _ in range(users)]
        factory.orgs = [factory.fresh("org") for _ in range(orgs)]
        return factory

    def fresh(self, prefix: str) -> str:
        return f"{prefix}_" + "".join(self.rng.choices(BASE62, k=27))

    def replacement(self, prefix: str) -> str:
        if prefix == "user":
            return self.rng.choice(self.users)
        if prefix == "org":
            return self.rng.choice(self.orgs)
        return self.fresh(prefix)


def rewrite_ids(value: Any, ids: IdFactory, mapping: dict[str, str]) -> Any:
    """Replace every Clerk id in a payload, the same original id by the same new one."""
    if isinstance(value, dict):
        return {key: rewrite_ids(item, ids, mapping) for key, item in value.items()}
    if isinstance(value, list):
        return [rewrite_ids(item, ids, mapping) for item in value]
    if isinstance(value, str) and (match := CLERK_ID.match(value)):
        prefix = match.group(1)
        if prefix in KEPT_PREFIXES:
            return value
        if value not in mapping:
            mapping[value] = ids.replacement(prefix)
        return mapping[value]
    return value


def type_weight(event_type: str) -> int:
    """User-side events are the most frequent, then organization events, then the rest."""
    if event_type.startswith(("user.", "session.", "email.", "sms.")):
        return 3
    if event_type.startswith("organization"):
        return 2
    return 1


def fresh_delivery(
    templates: list[dict[str, Any]], weights: list[int], ids: IdFactory, index: int
) -> Delivery:
    template = ids.rng.choices(templates, weights=weights)[0]
    envelope = rewrite_ids(template, ids, {})
    envelope["timestamp"] = int(template.get("timestamp", 0)) + index
    body = json.dumps(envelope, separators=(",", ":")).encode("utf-8")
    return Delivery(svix_id=ids.fresh("msg"), body=body)


def build_sends(
    count: int, duplicates: float, users: int, orgs: int, seed: int | None, workload: str
) -> list[Delivery]:
    """`count` sends; a `duplicates` share of them re-send an earlier svix-id with its body."""
    rng = random.Random(seed)
    repeat_at = set(rng.sample(range(1, count), round(count * duplicates))) if count > 1 else set()
    fresh = (
        lifecycle_deliveries(count - len(repeat_at), rng.randrange(2**32))
        if workload == "lifecycles"
        else shuffled_deliveries(rng, users, orgs)
    )
    unique: list[Delivery] = []
    sends: list[Delivery] = []
    for index in range(count):
        if index in repeat_at:
            sends.append(rng.choice(unique))
        else:
            unique.append(next(fresh))
            sends.append(unique[-1])
    return sends


def shuffled_deliveries(rng: random.Random, users: int, orgs: int) -> Iterator[Delivery]:
    """Samples drawn at random, their ids replaced: each object's versions in random order."""
    ids = IdFactory.create(rng, users, orgs)
    templates = [json.loads(body) for _, body in sample_bodies()]
    weights = [type_weight(t["type"]) for t in templates]
    for index in itertools.count():
        yield fresh_delivery(templates, weights, ids, index)


def lifecycle_deliveries(count: int, seed: int) -> Iterator[Delivery]:
    """bench/store_fill.py's objects, each created, updated and ended in time order."""
    for delivery in World(count, seed=seed).deliveries():
        yield Delivery(svix_id=delivery.svix_id, body=delivery.body.encode("utf-8"))


# -- the load ----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    elapsed: float = 0.0
    client_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def send_one(client: httpx.Client, secret: str, delivery: Delivery, result: LoadResult) -> None:
    headers = signed_headers(secret, delivery.svix_id, delivery.body)
    started = time.perf_counter()
    try:
        response = client.post(WEBHOOK_PATH, content=delivery.body, headers=headers)
    except httpx.TimeoutException:
        result.statuses["timeout"] += 1
        return
    except httpx.HTTPError as exc:
        result.statuses[type(exc).__name__] += 1
        result.errors.append(f"{type(exc).__name__}: {exc}")
        return
    result.latencies.append(time.perf_counter() - started)
    result.statuses[response.status_code] += 1
    if response.status_code == 200:
        result.outcomes[response.json().get("status", "?")] += 1
        result.acked.add(delivery.svix_id)
    elif len(result.errors) < 5:
        result.errors.append(f"{response.status_code}: {response.text[:200]}")


def client_loop(
    client: httpx.Client, secret: str, pending: SimpleQueue[Delivery], deadline: float
) -> LoadResult:
    """One client on its own keep-alive connection, taking deliveries until none are left."""
    result = LoadResult()
    while True:
        try:
            delivery = pending.get_nowait()
        except Empty:
            return result
        if time.perf_counter() > deadline:
            result.statuses["unsent"] += 1
        else:
            send_one(client, secret, delivery, result)


def merge(results: Sequence[LoadResult]) -> LoadResult:
    total = LoadResult()
    for result in results:
        total.latencies += result.latencies
        total.statuses += result.statuses
        total.outcomes += result.outcomes
        total.acked |= result.acked
        total.errors += result.errors
    return total


def run_load(
    base: str, secret: str, sends: Sequence[Delivery], clients: int, timeout: float, budget: float
) -> LoadResult:
    """Send every delivery from `clients` threads, each a client with its own connection.

    Threads with the blocking httpx client, rather than one AsyncClient: without `sniffio`
    installed httpcore's async pool retries an import on every request, and its pool bookkeeping
    grows with the number of connections, which made the client the bottleneck.
    """
    pending: SimpleQueue[Delivery] = SimpleQueue()
    for delivery in sends:
        pending.put(delivery)
    with contextlib.ExitStack() as stack:
        sessions = [
            stack.enter_context(httpx.Client(base_url=base, timeout=timeout))
            for _ in range(clients)
        ]
        pool = stack.enter_context(ThreadPoolExecutor(clients, thread_name_prefix="client"))
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + budget
        futures = [pool.submit(client_loop, s, secret, pending, deadline) for s in sessions]
        try:
            result = merge([future.result() for future in futures])
        except BaseException:  # stopped (SIGTERM, Ctrl-C): clients stop after their request
            while not pending.empty():
                pending.get_nowait()
            raise
        result.elapsed = time.perf_counter() - started
        result.client_cpu = time.process_time() - cpu_started
    return result


# -- stores ------------------------------------------------------------------------------------


class Store(Protocol):
    def ours_url(self) -> str: ...
    def baseline_url(self) -> str: ...
    def delivery_rows(self) -> list[tuple[str, bytes]]: ...
    def baseline_ids(self) -> list[str]: ...
    def drop(self) -> None: ...


class PostgresStore:
    """A schema of its own in the `test` database, dropped afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.schema = f"bench_{secrets.token_hex(6)}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))

    def ours_url(self) -> str:
        return f"{self.url}?schema={self.schema}"

    def baseline_url(self) -> str:
        return f"{self.url}?options=" + quote(f"-csearch_path={self.schema}", safe="")

    def _select(self, statement: sql.Composable) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return list(conn.execute(statement).fetchall())

    def delivery_rows(self) -> list[tuple[str, bytes]]:
        table = sql.Identifier(self.schema, "audit_events")
        rows = self._select(sql.SQL("SELECT topic, state FROM {}").format(table))
        return [(topic, bytes(state)) for topic, state in rows]

    def baseline_ids(self) -> list[str]:
        table = sql.Identifier(self.schema, "baseline_webhooks")
        return [row[0] for row in self._select(sql.SQL("SELECT id FROM {}").format(table))]

    def drop(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(self.schema)))


class SqliteStore:
    """A database file in a temporary directory, removed afterwards."""

    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="bench_ingest_")
        self.path = Path(self.folder.name) / "store.db"

    def ours_url(self) -> str:
        return f"sqlite:///{self.path}"

    def baseline_url(self) -> str:
        return f"sqlite:///{self.path}"

    def _select(self, statement: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as conn:
            return list(conn.execute(statement).fetchall())

    def delivery_rows(self) -> list[tuple[str, bytes]]:
        return [(t, bytes(s)) for t, s in self._select("SELECT topic, state FROM stored_events")]

    def baseline_ids(self) -> list[str]:
        return [row[0] for row in self._select("SELECT id FROM baseline_webhooks")]

    def drop(self) -> None:
        self.folder.cleanup()


def open_store(backend: Backend, postgres_url: str) -> Store:
    return PostgresStore(postgres_url) if backend == "postgres" else SqliteStore()


# -- the stored-exactly-once check -------------------------------------------------------------


@dataclass(frozen=True)
class StoredCheck:
    acked: int
    markers: int
    deliveries: int
    repeated: int
    missing: int
    extra: int

    @property
    def ok(self) -> bool:
        counts_match = self.markers == self.deliveries == self.acked
        return counts_match and not (self.repeated or self.missing or self.extra)


def compare(acked: set[str], markers: list[str], deliveries: list[str]) -> StoredCheck:
    stored = set(deliveries)
    return StoredCheck(
        acked=len(acked),
        markers=len(markers),
        deliveries=len(deliveries),
        repeated=len(deliveries) - len(stored),
        missing=len(acked - (stored & set(markers))),
        extra=len(stored - acked),
    )


def check_ours(store: Store, acked: set[str]) -> StoredCheck:
    markers: list[str] = []
    deliveries: list[str] = []
    for topic, state in store.delivery_rows():
        svix_id = json.loads(state)["svix_id"]
        if topic == MARKER_TOPIC:
            markers.append(svix_id)
        elif topic.removeprefix("clerk-audit:").startswith(DELIVERY_TOPICS):
            deliveries.append(svix_id)
    return compare(acked, markers, deliveries)


def check_baseline(store: Store, acked: set[str]) -> StoredCheck:
    rows = store.baseline_ids()
    return compare(acked, rows, rows)


# -- servers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: ServerName
    command: list[str]
    env: dict[str, str]


def server_spec(name: ServerName, store: Store, secret: str, port: int, workers: int) -> ServerSpec:
    env = {**os.environ, "CLERK_WEBHOOK_SIGNING_SECRET": secret}
    listen = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if name == "ours":
        env["AUDIT_DATABASE_URL"] = store.ours_url()
        env["AUDIT_API_TOKENS"] = API_TOKEN
        return ServerSpec(name, [*audit_command(), "serve", *listen], env)
    env["BASELINE_DATABASE"] = store.baseline_url()
    return ServerSpec(name, [sys.executable, str(BENCH_DIR / "baseline_app.py"), *listen], env)


@dataclass(frozen=True)
class RunConfig:
    backend: Backend
    postgres_url: str
    workers: int
    timeout: float
    budget: float
    hold_projections: bool = False


@dataclass(frozen=True)
class RunReport:
    server: ServerName
    clients: int
    load: LoadResult
    stored: StoredCheck
    problems: list[str]
    server_cpu: float  # the server's process tree, from the load's start until lag 0
    postgres_cpu: float  # every postgres process on the machine, over the same span
    busy_cores: float  # the whole machine's busy CPU seconds per second during the load
    caught_up: float | None  # seconds from the load's end until every projection's lag was 0


def projections_caught_up(base: str, limit: float = 60.0) -> float:
    """Seconds until `/v1/projections` shows every projection at lag 0 (polled every 20 ms)."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    while time.monotonic() < started + limit:
        rows = httpx.get(f"{base}/v1/projections", headers=headers, timeout=5).json()["data"]
        if all(row["lag"] == 0 for row in rows):
            return time.monotonic() - started
        time.sleep(0.02)
    return float("inf")


def projection_children(server: ServerProcess) -> list[int]:
    """The `audit project` processes a server started (under `audit serve`, its one child)."""
    found = [
        stat.pid
        for stat in tree(server.process.pid)
        if "project" in command_line(stat.pid)[1:] and stat.pid != server.process.pid
    ]
    if not found:
        raise RuntimeError(f"{server.name}: no `audit project` process to hold")
    return found


def signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def run_once(
    config: RunConfig, name: ServerName, clients: int, sends: Sequence[Delivery]
) -> RunReport:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    store = open_store(config.backend, config.postgres_url)
    try:
        port = free_port()
        spec = server_spec(name, store, secret, port, config.workers)
        with tempfile.NamedTemporaryFile(prefix=f"bench_{name}_", suffix=".log") as log:
            server = ServerProcess(spec.name, spec.command, spec.env, port, log)
            try:
                server.wait_ready()
                postgres = PostgresProcesses()
                cpu_before = (server.cpu_seconds(), postgres.cpu_seconds())
                busy_before = machine_busy_seconds()
                held = projection_children(server) if config.hold_projections else []
                signal_all(held, signal.SIGSTOP)
                try:
                    load = run_load(
                        server.base, secret, sends, clients, config.timeout, config.budget
                    )
                finally:
                    signal_all(held, signal.SIGCONT)
                busy_cores = (machine_busy_seconds() - busy_before) / load.elapsed
                caught_up = projections_caught_up(server.base) if name == "ours" else None
                server_cpu = server.cpu_seconds() - cpu_before[0]
                postgres_cpu = postgres.cpu_seconds() - cpu_before[1]
            finally:
                server.stop()
                problems = server.problems()
        checker = check_ours if name == "ours" else check_baseline
        stored = checker(store, load.acked)
        return RunReport(
            name, clients, load, stored, problems, server_cpu, postgres_cpu, busy_cores, caught_up
        )
    finally:
        store.drop()


def format_statuses(counts: Counter[Any]) -> str:
    return "{" + ", ".join(f"{key}: {counts[key]}" for key in sorted(counts, key=str)) + "}"


def print_report(backend: Backend, report: RunReport) -> None:
    load, stored = report.load, report.stored
    print(
        f"ingest backend={backend} server={report.server} clients={report.clients} "
        f"deliveries={load.sent} rate={load.rate:.1f}/s p50={load.percentile_ms(0.50):.1f}ms "
        f"p99={load.percentile_ms(0.99):.1f}ms statuses={format_statuses(load.statuses)} "
        f"outcomes={format_statuses(load.outcomes)} elapsed={load.elapsed:.1f}s "
        f"cpu_server={report.server_cpu:.1f}s cpu_client={load.client_cpu:.1f}s "
        f"cpu_postgres={report.postgres_cpu:.1f}s busy_cores={report.busy_cores:.2f}"
        + (f" lag_zero_after={report.caught_up:.2f}s" if report.caught_up is not None else "")
    )
    print(
        f"stored backend={backend} server={report.server} clients={report.clients} "
        f"acked={stored.acked} markers={stored.markers} rows={stored.deliveries} "
        f"repeated={stored.repeated} missing={stored.missing} extra={stored.extra} "
        f"{'ok' if stored.ok else 'MISMATCH'}"
    )
    for line in load.errors[:5] + report.problems[:10]:
        print(f"  {report.server}: {line}")
    if len(report.problems) > 10:
        print(f"  {report.server}: ... {len(report.problems) - 10} more problem lines in its log")
    sys.stdout.flush()


def ratio_of(reports: dict[ServerName, RunReport]) -> float:
    ours, baseline = reports["ours"].load.rate, reports["baseline"].load.rate
    return ours / baseline if baseline else float("nan")


def print_ratio(backend: Backend, clients: int, reports: dict[ServerName, RunReport]) -> None:
    ratio = ratio_of(reports)
    print(f"ratio backend={backend} clients={clients} ours/baseline={ratio:.2f}", flush=True)


def print_median(backend: Backend, clients: int, rounds: list[dict[ServerName, RunReport]]) -> None:
    """The median over rounds of each round's ratio: the machine's noise hits both servers of a
    round alike more often than it hits two rounds alike."""
    ratios = sorted(ratio_of(reports) for reports in rounds)
    p99s = {
        name: statistics.median(r[name].load.percentile_ms(0.99) for r in rounds)
        for name in ("ours", "baseline")
    }
    print(
        f"median backend={backend} clients={clients} rounds={len(rounds)}"
        f" ours/baseline={statistics.median(ratios):.2f}"
        f" ratios={','.join(f'{r:.2f}' for r in ratios)}"
        f" p99_ours={p99s['ours']:.1f}ms p99_baseline={p99s['baseline']:.1f}ms",
        flush=True,
    )


# -- command line ------------------------------------------------------------------------------


def client_counts(value: str) -> list[int]:
    counts = [int(part) for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 32 or 1,32")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--deliveries", type=int, default=5000, help="sends per run")
    parser.add_argument("--clients", type=client_counts, default=[32], help="e.g. 32 or 1,32")
    parser.add_argument("--single", action="store_true", help="shorthand for --clients 1")
    parser.add_argument("--duplicates", type=float, default=0.05, help="share of re-sends")
    parser.add_argument("--only", choices=["ours", "baseline", "both"], default="both")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers, both servers")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--workload",
        choices=["shuffled", "lifecycles"],
        default="shuffled",
        help="objects' versions in random order, or in time order as Clerk sends them",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of both servers in turn; prints the median"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--budget", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server and database")
    parser.add_argument(
        "--hold-projections",
        action="store_true",
        help="an upper bound, not a way to run: stop ours' projections during the load",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = RunConfig(
        args.backend,
        args.postgres,
        args.workers,
        args.timeout,
        args.budget,
        args.hold_projections,
    )
    servers: list[ServerName] = ["ours", "baseline"] if args.only == "both" else [args.only]
    sends = build_sends(
        args.deliveries, args.duplicates, args.users, args.orgs, args.seed, args.workload
    )
    print(
        f"# {len(sends)} sends, {len({d.svix_id for d in sends})} distinct svix-ids, "
        f"workers={args.workers}, backend={args.backend}, workload={args.workload}"
        + (", ours' projections held during the load" if args.hold_projections else ""),
        flush=True,
    )
    all_ok = True
    for clients in [1] if args.single else args.clients:
        rounds = []
        for _ in range(max(1, args.repeat)):
            reports = {name: run_once(config, name, clients, sends) for name in servers}
            for report in reports.values():
                print_report(args.backend, report)
                all_ok = all_ok and report.stored.ok
            if len(reports) == 2:
                print_ratio(args.backend, clients, reports)
                rounds.append(reports)
        if len(rounds) > 1:
            print_median(args.backend, clients, rounds)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
