"""Appends while `audit rebuild` replaces unswitched builds: the longest wait (SQLite).

A store of N deliveries, its projections live, and beside them a whole build of every
projection that was never switched (as an `audit rebuild` stopped before its switches leaves
them). One thread appends fresh deliveries at a steady rate, as webhooks arrive; the main thread
meanwhile rebuilds every projection as `audit rebuild --all` does in one process: it starts a
new build of each, which replaces the left one (`phase=start`), then catches them up and
switches them, dropping the old tables (`phase=build`). It prints each phase's seconds and the
longest wait of an append during it, against the longest before.

    python bench/start_build.py --events 100000
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*

from audit.aggregates.delivery import parse_delivery
from audit.application import AuditLog
from audit.config import parse_database_url
from audit.projections.runner import Projector
from bench.ingest import shuffled_deliveries
from bench.store_fill import World, bulk_load, project


def leave_builds(projector: Projector) -> None:
    for name, projection in projector.projections.items():
        generation = projector.rebuild(name)
        while projector.step(projection, generation):
            pass


def append_until(
    url: str, rate: float, stop: threading.Event, waits: list[tuple[float, float]]
) -> None:
    """Record fresh deliveries one at a time, `rate` a second, until `stop`; each one's start
    and wait. (Back to back, they outran the rebuild, which then never caught up.)"""
    log = AuditLog(parse_database_url(url))
    fresh = shuffled_deliveries(random.Random(7), 5000, 500)
    started = time.perf_counter()
    try:
        while not stop.wait(max(0.0, started + len(waits) / rate - time.perf_counter())):
            sent = next(fresh)
            delivery = parse_delivery(
                sent.body, svix_id=sent.svix_id, svix_timestamp=1, received_at=len(waits)
            )
            began = time.perf_counter()
            log.record([delivery])
            waits.append((began, time.perf_counter() - began))
    finally:
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="deliveries stored first")
    parser.add_argument("--rate", type=float, default=100.0, help="appends a second meanwhile")
    args = parser.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_start_") as folder:
        url = f"sqlite:///{folder}/store.db"
        log = AuditLog(parse_database_url(url))
        try:
            bulk_load(log, World(args.events, seed=1, late=0.01))
            project(log)
            projector = Projector(log)
            leave_builds(projector)
            stop = threading.Event()
            waits: list[tuple[float, float]] = []
            appender = threading.Thread(target=append_until, args=(url, args.rate, stop, waits))
            appender.start()
            time.sleep(1.0)  # appends alone first
            started = time.perf_counter()
            for name in projector.projections:
                projector.rebuild(name)
            built = time.perf_counter()
            projector.run_once()
            ended = time.perf_counter()
            time.sleep(0.5)
            stop.set()
            appender.join()
        finally:
            log.close()
    before = max((wait for began, wait in waits if began < started), default=0.0)
    for phase, start, end in (("start", started, built), ("build", built, ended)):
        during = [wait for began, wait in waits if began + wait >= start and began <= end]
        print(
            f"start_build backend=sqlite events={args.events} rate={args.rate:g}/s phase={phase}"
            f" seconds={end - start:.2f} appends_during={len(during)}"
            f" max_wait_during={1000 * max(during, default=0.0):.1f}ms"
            f" max_wait_before={1000 * before:.1f}ms",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
