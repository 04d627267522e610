"""Rebuild benchmark (issue 6): rebuild every projection over N bulk-loaded stored events, next to
the read-and-decode ceiling measured in the same run, with the rebuild's peak memory.

    python bench/rebuild.py --backend postgres --events 200000
    python bench/rebuild.py --backend postgres --sizes 50000,200000 --profile 30

Set-up (not the benchmark) generates N deliveries from the bundled samples, builds the stored
events exactly as `AuditLog.record` would (`recorded_event` + `marker_event` at per-stream
versions, through the application's mapper), and bulk-loads them: `COPY` on PostgreSQL, one
`executemany` transaction on SQLite. The ceiling and the rebuild then each run in a child process
(`--child`), so the parent's set-up memory does not count in the rebuild's peak RSS. The rebuild
does what `audit rebuild --all` does: on PostgreSQL with several cores, groups of projections in
processes of their own (audit.projections.parallel). `--rounds` then rebuilds the same store again
in one process, its projections' steps in turn, and prints each projection's own figures.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.store_fill

from audit.application import AuditLog
from audit.config import Database, PostgresDatabase, parse_database_url
from audit.projections import parallel
from audit.projections.base import Tables
from audit.projections.runner import BATCH_SIZE, MARKER_TOPIC, Projector, active_tables
from audit.runtime import collect_garbage_less_often
from audit.storage import postgres_connect_args
from bench.procstat import PostgresProcesses, machine_busy_seconds
from bench.store_fill import World, bulk_load

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


# -- the measured phases (each in a child process) -------------------------------------------


def vm_hwm_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU of this process and of its children that have exited (a rebuild's processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> float:
    """The larger peak resident set: this process's, or that of its largest exited child."""
    return max(vm_hwm_mb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


_POSTGRES = PostgresProcesses()


class Usage:
    """Wall time, CPU and peak memory of one measured phase. `db_cpu` is the CPU of the
    postgres processes alive at its start and end (a process's backends that exit before the
    end are missed); `other_cpu` is the whole machine's busy CPU less this phase's own Python:
    PostgreSQL's, on a machine that is otherwise quiet."""

    def __init__(self) -> None:
        self.base_rss = vm_hwm_mb()
        self.cpu, self.db_cpu = cpu_seconds(), _POSTGRES.cpu_seconds()
        self.busy = machine_busy_seconds()
        self.started = time.perf_counter()

    def result(self) -> dict[str, float]:
        cpu = cpu_seconds() - self.cpu
        return {
            "seconds": time.perf_counter() - self.started,
            "cpu": cpu,
            "db_cpu": _POSTGRES.cpu_seconds() - self.db_cpu,
            "other_cpu": machine_busy_seconds() - self.busy - cpu,
            "base_rss_mb": self.base_rss,
            "peak_rss_mb": peak_rss_mb(),
        }


def child_ceiling(database: Database, batch: int) -> dict[str, Any]:
    """Read every stored event in position order, in batches, with the runner's own read SQL,
    and decode the deliveries with the runner's own `decode`, projecting nothing."""
    log = AuditLog(database)
    try:
        projector = Projector(log, batch_size=batch)
        db = projector.db
        position, rows_read, decoded = 0, 0, 0
        usage = Usage()
        while True:
            with db.transaction() as cursor:
                rows = projector._read_after(cursor, position, batch)
            for row in rows:
                if row["topic"] != MARKER_TOPIC:
                    projector.decode(row)
                    decoded += 1
            rows_read += len(rows)
            if rows:
                position = rows[-1]["position"]
            if len(rows) < batch:
                break
        return {**usage.result(), "rows": rows_read, "deliveries": decoded}
    finally:
        log.close()


def child_rebuild(database: Database, batch: int, profile_top: int) -> dict[str, Any]:
    """`audit rebuild --all`: on PostgreSQL with several cores, groups of projections rebuilt
    in processes of their own; else, and when profiling, in this process, in rounds."""
    log = AuditLog(database)
    try:
        projector = Projector(log, batch_size=batch)
        groups = parallel.rebuild_groups(database, list(projector.projections.values()))
        if profile_top or len(groups) == 1:
            return child_rebuild_in_rounds(database, batch, profile_top)
        usage = Usage()
        for name in projector.projections:
            projector.rebuild(name)
        parallel.catch_up_in_processes(database, groups, batch_size=batch)
        return {**usage.result(), **_outcome(projector), "per_projection": {}, "groups": groups}
    finally:
        log.close()


# A generation number no build reaches: the write floor's scratch tables.
FLOOR_GENERATION = 999_999


def child_floor(database: Database) -> dict[str, Any]:
    """The write floor (PostgreSQL): every row the rebuild wrote, written again by PostgreSQL
    alone into empty tables of the same schema, with no Python per row: `INSERT ... SELECT`
    from the live tables, one projection at a time on one connection, its own indexes first
    and the read indexes after, as a build makes them. No projector, however its rows were
    made, writes these tables faster on one connection. (If anything it is low: a compressed
    payload is copied as it is, not compressed again as the rebuild's COPY does.)"""
    log = AuditLog(database)
    try:
        projector = Projector(log)
        db = projector.db
        usage = Usage()
        per_projection: dict[str, float] = {}
        rows = 0
        for projection in projector.projections.values():
            live = active_tables(db, projection.name)
            scratch = Tables(db, projection.name, FLOOR_GENERATION)
            began = time.perf_counter()
            with db.transaction() as cursor:
                for statement in projection.schema(scratch, db):
                    cursor.execute(statement)
                for table in projection.table_names:
                    cursor.execute(f"INSERT INTO {scratch[table]} SELECT * FROM {live[table]}")
                    rows += cursor.rowcount
                for statement in projection.read_indexes(scratch):
                    cursor.execute(statement)
            per_projection[projection.name] = time.perf_counter() - began
            with db.transaction() as cursor:
                projector._drop_tables(cursor, scratch)
        return {**usage.result(), "rows": rows, "per_projection": per_projection}
    finally:
        log.close()


def _outcome(projector: Projector) -> dict[str, Any]:
    return {
        "indexed": _count(projector, "events", "events"),
        "errors": projector.db.fetchone(
            f"SELECT COUNT(*) AS n FROM {projector.db.table('projection_errors')}"
        )["n"],
        "states": sorted({row["state"] for row in projector.status()}),
    }


def child_rebuild_in_rounds(
    database: Database, batch: int, profile_top: int, *, build: bool = True
) -> dict[str, Any]:
    """Every projection rebuilt in this process, their steps in turn, each step timed.

    `build=False` (`--follow`): no build; the live generations catch up with the store, as the
    projections' child under `audit serve` does after a burst (read indexes in place)."""
    log = AuditLog(database)
    try:
        projector = Projector(log, batch_size=batch)
        profiler = cProfile.Profile() if profile_top else None
        # name -> [wall seconds, this process's CPU, PostgreSQL's CPU] spent in its steps
        per_projection: dict[str, list[float]] = {}
        step = projector.step

        def timed_step(projection: Any, generation: int, limit: int | None = None) -> int:
            began = (time.perf_counter(), cpu_seconds(), _POSTGRES.cpu_seconds())
            try:
                return step(projection, generation, limit)
            finally:
                ended = (time.perf_counter(), cpu_seconds(), _POSTGRES.cpu_seconds())
                spent = per_projection.setdefault(projection.name, [0.0, 0.0, 0.0])
                for i, (start, end) in enumerate(zip(began, ended, strict=True)):
                    spent[i] += end - start

        projector.step = timed_step  # type: ignore[method-assign]  # time each projection's steps
        usage = Usage()
        if profiler:
            profiler.enable()
        # Start every build, then step them in turn.
        for name in projector.projections if build else ():
            projector.rebuild(name)
        projector.run_once()
        if profiler:
            profiler.disable()
        result = {
            **usage.result(),
            **_outcome(projector),
            "per_projection": per_projection,
            "groups": [list(projector.projections)],
        }
        if profiler:
            result["profile"] = _profile_text(profiler, profile_top)
        return result
    finally:
        log.close()


def _count(projector: Projector, name: str, table: str) -> int:
    tables = active_tables(projector.db, name)
    return projector.db.fetchone(f"SELECT COUNT(*) AS n FROM {tables[table]}")["n"]


def _profile_text(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def run_child(
    phase: str, backend: str, url: str, batch: int, profile_top: int = 0
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", phase, "--backend", backend]
    command += ["--database-url", url, "--batch", str(batch), "--profile", str(profile_top)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child {phase} failed with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the command -----------------------------------------------------------------------------


def fresh_store(backend: str, postgres: str) -> tuple[Database, str, Any]:
    """A new empty store: its Database, its URL, and what to remove afterwards."""
    if backend == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="bench_rebuild_"))
        url = f"sqlite:///{folder / 'audit.db'}"
        return parse_database_url(url), url, folder
    schema = f"bench_{secrets.token_hex(4)}"
    url = f"{postgres}?schema={schema}"
    return parse_database_url(url), url, schema


def drop_store(database: Database, leftover: Any) -> None:
    if isinstance(database, PostgresDatabase):
        with psycopg.connect(**postgres_connect_args(database)) as conn:
            conn.autocommit = True
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(leftover))
            )
    else:
        shutil.rmtree(leftover, ignore_errors=True)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else 0.0


def report_rebuild(
    tag: str,
    events: int,
    ceiling_rate: float,
    rebuilt: dict[str, Any],
    batch: int,
    label: str = "rebuild",
) -> bool:
    """Print a rebuild's lines (`label`: or a live catch-up's); whether every event was indexed
    without an error."""
    rebuild_rate = rate(events, rebuilt["seconds"])
    for name, (seconds, cpu, db_cpu) in rebuilt["per_projection"].items():
        print(
            f"projection {tag} name={name} seconds_in_steps={seconds:.1f}"
            f" rate={rate(events, seconds):.0f}/s"
            f" ratio={rate(events, seconds) / ceiling_rate:.2f}"
            f" cpu_python={cpu:.1f}s cpu_postgres={db_cpu:.1f}s",
            flush=True,
        )
    ok = rebuilt["indexed"] == events and rebuilt["errors"] == 0
    print(
        f"{label} {tag} ceiling={ceiling_rate:.0f}/s {label}={rebuild_rate:.0f}/s"
        f" ratio={rebuild_rate / ceiling_rate:.2f} peak_rss_mb={rebuilt['peak_rss_mb']:.0f}"
        f" base_rss_mb={rebuilt['base_rss_mb']:.0f} seconds={rebuilt['seconds']:.1f}"
        f" cpu_python={rebuilt['cpu']:.1f}s"
        # In processes, the backends exit with them, before their CPU can be read.
        + (f" cpu_postgres={rebuilt['db_cpu']:.1f}s" if len(rebuilt["groups"]) == 1 else "")
        + f" cpu_other={rebuilt['other_cpu']:.1f}s"
        f" processes={'|'.join(','.join(group) for group in rebuilt['groups'])}"
        f" batch={batch} indexed={rebuilt['indexed']} errors={rebuilt['errors']}"
        f" states={','.join(rebuilt['states'])} load1={os.getloadavg()[0]:.1f}"
        f" {'ok' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


def run_size(args: argparse.Namespace, events: int) -> dict[str, Any]:
    database, url, leftover = fresh_store(args.backend, args.postgres)
    tag = f"backend={args.backend} events={events}"
    try:
        started = time.perf_counter()
        log = AuditLog(database)  # creates the tables
        try:
            if args.follow:  # every projection live at position 0, its read indexes in place
                Projector(log).run_once()
            bulk_load(log, World(events, args.seed, args.late))
        finally:
            log.close()
        setup = time.perf_counter() - started
        print(
            f"setup {tag} stored={2 * events} seconds={setup:.1f}"
            f" rate={rate(events, setup):.0f}/s (generate+convert+bulk load, not the benchmark)",
            flush=True,
        )
        ceiling = run_child("ceiling", args.backend, url, args.batch)
        assert ceiling["deliveries"] == events, ceiling
        ceiling_rate = rate(events, ceiling["seconds"])
        print(
            f"ceiling {tag} batch={args.batch} seconds={ceiling['seconds']:.1f}"
            f" rate={ceiling_rate:.0f}/s cpu_python={ceiling['cpu']:.1f}s"
            f" cpu_postgres={ceiling['db_cpu']:.1f}s peak_rss_mb={ceiling['peak_rss_mb']:.0f}"
            f" load1={os.getloadavg()[0]:.1f}",
            flush=True,
        )
        if args.follow:
            followed = run_child("follow", args.backend, url, args.batch)
            ok = report_rebuild(tag, events, ceiling_rate, followed, args.batch, "follow")
            return {"events": events, "peak_rss_mb": followed["peak_rss_mb"], "ok": ok}
        rebuilt = run_child("rebuild", args.backend, url, args.batch)
        ok = report_rebuild(tag, events, ceiling_rate, rebuilt, args.batch)
        if args.floor:
            floor = run_child("floor", args.backend, url, args.batch)
            print(
                f"floor {tag} rows={floor['rows']} seconds={floor['seconds']:.1f}"
                f" cpu_postgres={floor['db_cpu']:.1f}s "
                + " ".join(
                    f"{name}={seconds:.1f}s" for name, seconds in floor["per_projection"].items()
                )
                + f" ceiling_seconds={ceiling['seconds']:.1f}"
                f" best_ratio_one_writer={ceiling['seconds'] / floor['seconds']:.2f}",
                flush=True,
            )
        if args.rounds:  # the same store rebuilt again, in one process (per-projection figures)
            rounds = run_child("rounds", args.backend, url, args.batch)
            ok = report_rebuild(tag, events, ceiling_rate, rounds, args.batch) and ok
        if args.profile:
            profiled = run_child("rebuild", args.backend, url, args.batch, args.profile)
            print(f"# cProfile of a second rebuild ({profiled['seconds']:.1f}s under the profiler)")
            print(profiled["profile"], flush=True)
        return {"events": events, "peak_rss_mb": rebuilt["peak_rss_mb"], "ok": ok}
    finally:
        if not args.keep:
            drop_store(database, leftover)
        else:
            print(f"# kept store {url}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--events", type=int, default=1_000_000, help="deliveries to store")
    parser.add_argument("--sizes", help="comma-separated event counts, run in turn (memory check)")
    parser.add_argument("--batch", type=int, default=BATCH_SIZE, help="projector batch size")
    parser.add_argument("--late", type=float, default=0.01, help="share of late deliveries")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also profile a second rebuild; top N"
    )
    parser.add_argument("--keep", action="store_true", help="keep the store (prints its URL)")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server and database URL")
    parser.add_argument(
        "--rounds",
        action="store_true",
        help="then rebuild again in one process, in rounds, with per-projection figures",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="instead of a rebuild: live projections catch up with the stored events",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="then write the rebuilt rows again in PostgreSQL alone: the write floor",
    )
    parser.add_argument(
        "--child",
        choices=["ceiling", "rebuild", "rounds", "follow", "floor"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        # Both phases as `audit rebuild` runs: the ceiling decodes with the same collector
        # settings as the rebuild it is compared with.
        collect_garbage_less_often()
        database = parse_database_url(args.database_url)
        if args.child == "ceiling":
            result = child_ceiling(database, args.batch)
        elif args.child == "floor":
            result = child_floor(database)
        elif args.child in ("rounds", "follow"):
            result = child_rebuild_in_rounds(
                database, args.batch, args.profile, build=args.child == "rounds"
            )
        else:
            result = child_rebuild(database, args.batch, args.profile)
        print(json.dumps(result))
        return 0
    sizes = [int(size) for size in args.sizes.split(",")] if args.sizes else [args.events]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cpus python {sys.version.split()[0]}"
    )
    results = [run_size(args, size) for size in sizes]
    if len(results) > 1:
        peaks = " ".join(f"{r['events']}:{r['peak_rss_mb']:.0f}" for r in results)
        spread = max(r["peak_rss_mb"] for r in results) / min(r["peak_rss_mb"] for r in results)
        print(f"memory backend={args.backend} peak_rss_mb_by_events={peaks} max/min={spread:.2f}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
