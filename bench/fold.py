"""Fold benchmark (issue 3): one long user stream, folded with and without a snapshot.

Also shows that the webhook path does not fold: appending to a user with N events costs what
appending to a new user costs.

    python bench/fold.py --backend postgres --events 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.aggregates.delivery import Delivery, parse_delivery
from audit.application import AuditLog
from audit.config import Database, PostgresDatabase, SqliteDatabase

SAMPLES = Path(__file__).resolve().parents[1] / "audit" / "samples"
LONG_USER = "user_long"


def session(user_id: str, index: int) -> Delivery:
    envelope = json.loads((SAMPLES / "session.created.json").read_text())
    envelope["data"].update(id=f"sess_{user_id}_{index}", user_id=user_id)
    envelope["data"]["updated_at"] = envelope["timestamp"] = 1_716_883_200_000 + index
    raw = json.dumps(envelope).encode()
    return parse_delivery(raw, svix_id=f"msg_{uuid.uuid4().hex}", svix_timestamp=1, received_at=1)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(action) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(database: Database, events: int, appends: int) -> None:
    log = AuditLog(database)
    try:
        setup = timed(
            lambda: [
                log.record([session(LONG_USER, i) for i in range(s, min(s + 500, events))])
                for s in range(0, events, 500)
            ]
        )
        print(f"setup events={events} seconds={setup:.1f}")

        long_appends = [timed(lambda: log.record([session(LONG_USER, events + 1)]))]
        long_appends += [
            timed(lambda i=i: log.record([session(LONG_USER, events + 2 + i)]))
            for i in range(appends)
        ]
        fresh_appends = [
            timed(lambda i=i: log.record([session(f"user_fresh_{i}", 0)])) for i in range(appends)
        ]
        long_ms, fresh_ms = median_ms(long_appends), median_ms(fresh_appends)
        print(
            f"append stream_events={events} median={long_ms:.2f}ms"
            f" new_stream_median={fresh_ms:.2f}ms ratio={long_ms / fresh_ms:.2f}"
        )

        total = events + appends + 1
        full = timed(lambda: log.user_state(LONG_USER, as_of=2**62))
        print(f"fold mode=full events={total} seconds={full:.2f} rate={total / full:.0f}/s")
        snapshot_taking = timed(lambda: log.user_state(LONG_USER))
        print(f"fold mode=first_read_takes_snapshot seconds={snapshot_taking:.2f}")
        for i in range(50):
            log.record([session(LONG_USER, total + i)])
        with_snapshot = timed(lambda: log.user_state(LONG_USER))
        print(
            f"fold mode=snapshot_plus_50 events={total + 50} seconds={with_snapshot:.3f}"
            f" speedup={full / with_snapshot:.0f}x"
        )
    finally:
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    if args.backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            run(SqliteDatabase(Path(folder) / "fold.db"), args.events, args.appends)
        return
    schema = f"bench_fold_{uuid.uuid4().hex[:8]}"
    database = PostgresDatabase("127.0.0.1", 5432, "postgres", "", "test", schema)
    try:
        run(database, args.events, args.appends)
    finally:
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
