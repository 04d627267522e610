"""Several real processes on one store, things failing underneath them, and the end checks.

Used by the quick CI test (tests/test_multiprocess.py) and the long run (tests/soak/run.py).
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from audit.application import AuditLog
from audit.projections.runner import Projector, active_tables
from tests.soak.sender import Message

SAMPLES = Path(__file__).resolve().parents[2] / "audit" / "samples"
AUDIT = [sys.executable, "-m", "audit.cli"]
PROJECT = "audit.cli project"  # in the command line of the child `audit serve` projects with


def messages(count: int, *, seed: int = 0, users: int = 50, orgs: int = 10) -> list[Message]:
    """Realistic deliveries about a small population, so that order and staleness matter."""
    rng = random.Random(seed)
    samples = [json.loads(p.read_text()) for p in sorted(SAMPLES.glob("*.json"))]
    out = []
    for index in range(count):
        envelope = copy.deepcopy(rng.choice(samples))
        data = envelope["data"]
        user = f"user_{rng.randrange(users)}"
        org = f"org_{rng.randrange(orgs)}"
        family = envelope["type"].split(".")[0]
        stamp = 1_716_883_200_000 + index * 1000
        envelope["timestamp"] = stamp + 18
        if "updated_at" in data:
            data["updated_at"] = stamp
        if family == "user":
            data["id"] = user
            data["first_name"] = f"name{index}"
        elif family in ("session", "email", "sms"):
            data["id"] = f"{family}_{index}"
            data["user_id"] = user
        elif family == "organization":
            data["id"] = org
        elif family == "organizationMembership":
            data["id"] = f"orgmem_{user}_{org}"
            data["organization"]["id"] = org
            data["public_user_data"]["user_id"] = user
        elif family in ("organizationInvitation", "organizationDomain"):
            data["id"] = f"{family}_{rng.randrange(count // 4 + 1)}"
            if "organization_id" in data:
                data["organization_id"] = org
        else:
            data["id"] = f"{family}_{index}"
        out.append(Message(f"msg_{seed}_{index}", json.dumps(envelope).encode()))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    env: dict[str, str]
    running: dict[str, subprocess.Popen] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [*AUDIT, *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.running[name] = process
        return process

    def serve(self, name: str, *options: str, workers: int = 1) -> str:
        port = free_port()
        self.start(name, "serve", "--port", str(port), "--workers", str(workers), *options)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return f"{url}/webhooks/clerk"
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not start")

    def kill9(self, name: str) -> None:
        """SIGKILL the process (and, for a multi-worker server, its workers)."""
        process = self.running[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.kills[name] += 1

    def kill_one_worker(self, name: str) -> bool:
        """SIGKILL one worker of a `--workers N` server; its supervisor starts another."""
        # uvicorn spawns its workers through multiprocessing; the other child is the projector.
        parent = self.running[name].pid
        workers = [
            p.pid for p in live_processes() if p.parent == parent and "spawn_main" in p.command
        ]
        if not workers:
            return False
        os.kill(workers[-1], signal.SIGKILL)
        self.kills[f"{name}-worker"] += 1
        return True

    def kill_projector_child(self, name: str) -> bool:
        """SIGKILL the `audit project` child of an `audit serve` (waiting, up to 60 s, for one to be
        running: the last one killed may not be restarted yet); the server starts another."""
        deadline = time.monotonic() + 60
        while True:
            found = projector_children(self.running[name].pid)
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid in found:
            os.kill(pid, signal.SIGKILL)
            self.kills["projector"] += 1
        return bool(found)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                terminate(process)
        self.running.clear()


@dataclass(frozen=True)
class LiveProcess:
    pid: int
    parent: int
    command: str


def live_processes() -> list[LiveProcess]:
    """Every process on this machine, with its parent and command line (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
            found.append(
                LiveProcess(int(stat.parent.name), parent, command.decode(errors="replace"))
            )
    return found


def projector_children(server: int) -> list[int]:
    """The `audit project` child that the `audit serve` process `server` runs, if one is up."""
    return [p.pid for p in live_processes() if p.parent == server and PROJECT in p.command]


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM the process group; SIGKILL it if it has not gone in 15 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def processes(env: dict[str, str]) -> Iterator[Processes]:
    running = Processes(env)
    try:
        yield running
    finally:
        running.stop_all()


@dataclass
class StoreCheck:
    stored: int
    markers: int
    stored_twice: int
    missing: int
    unacknowledged: int

    @property
    def ok(self) -> bool:
        return self.stored == self.markers and not (self.stored_twice or self.missing)

    def summary(self) -> str:
        return (
            f"stored={self.stored} markers={self.markers} stored_twice={self.stored_twice}"
            f" missing={self.missing} stored_unacknowledged={self.unacknowledged}"
        )


def check_store(log: AuditLog, acknowledged: set[str]) -> StoreCheck:
    """Every acknowledged svix-id stored exactly once, with its marker."""
    table = log.db.table(log.db.events_table)
    rows = log.db.fetchall(f"SELECT topic, state FROM {table}")
    ids: Counter[str] = Counter()
    markers = 0
    for row in rows:
        if row["topic"].endswith("DeliveryMarker.Created"):
            markers += 1
        else:
            ids[json.loads(bytes(row["state"]))["svix_id"]] += 1
    return StoreCheck(
        stored=sum(ids.values()),
        markers=markers,
        stored_twice=sum(1 for n in ids.values() if n > 1),
        missing=len(acknowledged - set(ids)),
        unacknowledged=len(set(ids) - acknowledged),
    )


def wait_for_no_lag(log: AuditLog, timeout: float) -> float | None:
    """Seconds until every projection (followed by the running processes) has no lag."""
    projector = Projector(log)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(row["lag"] == 0 and row["state"] == "live" for row in projector.status()):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def projection_rows(log: AuditLog) -> dict[str, dict[str, list]]:
    projector = Projector(log)
    result = {}
    for projection in projector.projections.values():
        tables = active_tables(log.db, projection.name)
        result[projection.name] = {
            name: sorted(
                (
                    repr(sorted(dict(row).items()))
                    for row in log.db.fetchall(f"SELECT * FROM {tables[name]}")
                ),
            )
            for name in projection.table_names
        }
    return result


def mismatched_rows_after_rebuild(log: AuditLog) -> int:
    """Rebuild every projection from the stream; count rows that differ from the live tables."""
    live = projection_rows(log)
    projector = Projector(log)
    for name in projector.projections:
        projector.rebuild(name)
    projector.run_once()
    rebuilt = projection_rows(log)
    mismatched = 0
    for projection, tables in live.items():
        for table, rows in tables.items():
            mismatched += len(set(rows) ^ set(rebuilt[projection][table]))
            mismatched += abs(len(rows) - len(rebuilt[projection][table]))
    return mismatched
