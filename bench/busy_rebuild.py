"""Webhooks during a rebuild: what `audit rebuild --all` costs the deliveries arriving meanwhile.

A store of N deliveries, its projections live, served by `audit serve`. In the same run:
(1) the webhooks alone: C clients send fresh signed deliveries for a few seconds; (2) the rebuild
alone; (3) both at once: the clients send for as long as `audit rebuild --all` runs. It prints the
webhooks' rate and latency in (1) and (3), and the rebuild's seconds in (2) and (3), each as a
ratio of its own baseline from the same run. See bench/README.md.

    python bench/busy_rebuild.py --backend sqlite --events 30000 --clients 4
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*

from audit.application import AuditLog
from audit.config import parse_database_url
from bench.ingest import (
    DEFAULT_POSTGRES,
    Delivery,
    LoadResult,
    PostgresStore,
    SqliteStore,
    merge,
    send_one,
    server_spec,
    shuffled_deliveries,
)
from bench.serverproc import TREE, ServerProcess, audit_command, free_port
from bench.store_fill import World, bulk_load, project


def send_until(
    base: str, secret: str, fresh: Iterator[Delivery], clients: int, stop: threading.Event
) -> tuple[LoadResult, float]:
    """`clients` threads, each on its own connection, sending fresh deliveries until `stop`;
    also when the slowest request was sent, in seconds from the start."""
    lock = threading.Lock()
    results = [LoadResult() for _ in range(clients)]
    slowest = [0.0, 0.0]  # the longest request's seconds, and when it was sent
    started = time.perf_counter()

    def client(result: LoadResult) -> None:
        with httpx.Client(base_url=base, timeout=30.0) as session:
            while not stop.is_set():
                with lock:
                    delivery = next(fresh)
                began = time.perf_counter()
                send_one(session, secret, delivery, result)
                waited = time.perf_counter() - began
                with lock:
                    if waited > slowest[0]:
                        slowest[:] = [waited, began - started]

    threads = [threading.Thread(target=client, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = merge(results)
    total.elapsed = time.perf_counter() - started
    return total, slowest[1]


def rebuild(env: dict[str, str]) -> float:
    """`audit rebuild --all` to the end; its seconds."""
    started = time.perf_counter()
    subprocess.run(
        [*audit_command(), "rebuild", "--all"],
        env={**env, "PYTHONPATH": str(TREE)},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def webhooks_line(tag: str, phase: str, load: LoadResult) -> str:
    return (
        f"webhooks {tag} phase={phase} sent={load.sent} rate={load.rate:.1f}/s"
        f" p50={load.percentile_ms(0.5):.1f}ms p99={load.percentile_ms(0.99):.1f}ms"
        f" max={1000 * max(load.latencies, default=0.0):.1f}ms statuses={dict(load.statuses)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--events", type=int, default=30_000, help="deliveries stored first")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alone-seconds", type=float, default=8.0)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    args = parser.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cpus", flush=True)

    store = SqliteStore() if args.backend == "sqlite" else PostgresStore(args.postgres)
    url = store.ours_url()
    tag = f"backend={args.backend} events={args.events} clients={args.clients}"
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    port = free_port()
    spec = server_spec("ours", store, secret, port, workers=1)
    env = spec.env  # `audit rebuild` runs on the same store
    try:
        log = AuditLog(parse_database_url(url))
        try:
            bulk_load(log, World(args.events, seed=1, late=0.01))
            project(log)
        finally:
            log.close()
        fresh = shuffled_deliveries(random.Random(7), 5000, 500)
        with tempfile.NamedTemporaryFile(prefix="bench_busy_", suffix=".log") as server_log:
            server = ServerProcess("ours", spec.command, env, port, server_log)
            try:
                server.wait_ready()
                stop = threading.Event()
                timer = threading.Timer(args.alone_seconds, stop.set)
                timer.start()
                alone, _ = send_until(server.base, secret, fresh, args.clients, stop)
                print(webhooks_line(tag, "alone", alone), flush=True)
                quiet = rebuild(env)
                print(f"rebuild {tag} phase=alone seconds={quiet:.1f}", flush=True)
                stop = threading.Event()
                busy_seconds: list[float] = []

                def rebuild_then_stop() -> None:
                    try:
                        busy_seconds.append(rebuild(env))
                    finally:
                        stop.set()

                rebuilder = threading.Thread(target=rebuild_then_stop)
                rebuilder.start()
                during, slowest_at = send_until(server.base, secret, fresh, args.clients, stop)
                rebuilder.join()
                print(webhooks_line(tag, "during_rebuild", during), flush=True)
                print(
                    f"rebuild {tag} phase=under_load seconds={busy_seconds[0]:.1f}"
                    f" slowdown={busy_seconds[0] / quiet:.2f}",
                    flush=True,
                )
                print(
                    f"busy {tag} webhook_rate_ratio={during.rate / alone.rate:.2f}"
                    f" p99_during={during.percentile_ms(0.99):.1f}ms"
                    f" max_during={1000 * max(during.latencies, default=0.0):.1f}ms"
                    f" max_sent_at={slowest_at:.1f}s"
                    f" rebuild_slowdown={busy_seconds[0] / quiet:.2f}"
                    f" problems={len(server.problems())}",
                    flush=True,
                )
            finally:
                server.stop()
    finally:
        store.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
