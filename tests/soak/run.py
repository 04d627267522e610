"""The long reliability run (issue 7): 20,000 deliveries through several processes on one
PostgreSQL database, with SIGKILLs and a database restart in the middle, then the end checks.

    .venv/bin/python -m tests.soak.run --deliveries 20000 --projector-kills 6

It restarts the local PostgreSQL server (pg_ctlcluster), so run it on a machine of your own.
Prints one line of figures per phase and exits 1 if any end check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

from audit.application import AuditLog
from audit.config import parse_database_url
from tests.soak.scenario import (
    check_store,
    messages,
    mismatched_rows_after_rebuild,
    processes,
    wait_for_no_lag,
)
from tests.soak.sender import Report, SvixLikeSender


class ProgressSender(SvixLikeSender):
    attempts = 0

    def _attempts(self, message, index, report):  # type: ignore[no-untyped-def]
        ProgressSender.attempts += 1
        return super()._attempts(message, index, report)


def restart_postgres() -> float:
    """Restart the local cluster; returns how long it was down."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    started = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True
    )
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--projector-kills", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    schema = f"soak_{uuid.uuid4().hex[:8]}"
    url = f"{args.postgres}?schema={schema}"
    secret = "whsec_" + __import__("base64").b64encode(os.urandom(24)).decode()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "CLERK_"))}
    env.update(AUDIT_DATABASE_URL=url, CLERK_WEBHOOK_SIGNING_SECRET=secret, AUDIT_API_TOKENS="t")
    log = AuditLog(parse_database_url(url))
    ok = True
    try:
        with processes(env) as running:
            # The projector is the child `audit serve` runs and restarts.
            endpoint = running.serve("api", workers=args.workers)
            sender = ProgressSender([endpoint], secret, concurrency=16, seed=7)
            report_holder: list[Report] = []
            started = time.monotonic()
            thread = threading.Thread(
                target=lambda: report_holder.append(
                    sender.send_all(messages(args.deliveries, seed=7, users=2000, orgs=200))
                )
            )
            thread.start()
            total = args.deliveries * 1.05
            plan = [(i + 1) / (args.projector_kills + 3) for i in range(args.projector_kills + 2)]
            events = ["worker"] + ["projector"] * args.projector_kills + ["database"]
            downtime = 0.0
            for fraction, event in zip(plan, events, strict=True):
                while ProgressSender.attempts < fraction * total and thread.is_alive():
                    time.sleep(0.05)
                if event == "worker":
                    running.kill_one_worker("api")
                elif event == "projector":
                    running.kill_projector_child("api")
                else:
                    downtime = restart_postgres()
                    running.kills["database-restart"] += 1
            thread.join()
            elapsed = time.monotonic() - started
            report = report_holder[0]
            log.db.heal()  # this checking process's own pool lived through the restart too
            print(
                f"soak sent deliveries={args.deliveries} seconds={elapsed:.1f} {report.summary()}"
            )
            print(f"soak injected {dict(running.kills)} database_down_seconds={downtime:.1f}")
            server_errors = {
                s: n for s, n in report.statuses.items() if s.startswith("5") and s != "503"
            }
            store = check_store(log, report.acknowledged)
            lag_seconds = wait_for_no_lag(log, timeout=120)
            print(
                f"soak store {store.summary()} duplicates_refused={report.answers['duplicate']}"
                f" 5xx_other_than_503={server_errors} lag_zero_after={lag_seconds}"
            )
            ok = (
                store.ok
                and not report.gave_up
                and not server_errors
                and lag_seconds is not None
                and len(report.acknowledged) == args.deliveries
            )
            running.stop_all()
        mismatched = mismatched_rows_after_rebuild(log)
        print(f"soak projections mismatched_rows_after_rebuild={mismatched}")
        ok = ok and mismatched == 0
    finally:
        log.close()
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print("soak", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
