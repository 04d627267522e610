"""How `audit serve` runs: projections in a child process of their own, and `--workers N`
answering keep-alive requests without Nagle's delay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from audit.config import Database
from audit.samples import signed_headers
from tests.conftest import API_TOKEN, new_secret
from tests.soak.scenario import (
    AUDIT,
    PROJECT,
    free_port,
    live_processes,
    processes,
    projector_children,
    terminate,
)
from tests.webhook_helpers import payload


def test_the_workers_listening_socket_gives_connections_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY only on connections accepted from a socket whose `proto` is
    IPPROTO_TCP; uvicorn before 0.55 bound its workers' socket with `proto` 0, and each
    keep-alive response then waited ~40 ms for the client's delayed ACK (bench/query.py)."""
    config = uvicorn.Config("api.app:app_from_env", host="127.0.0.1", port=0, workers=2)
    listening = config.bind_socket()

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        # As each uvicorn worker does with the socket it inherits.
        server = await asyncio.start_server(on_connect, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(accepted_nodelay()) != 0


# -- the projections' process ------------------------------------------------------------------


def projector_of(server: subprocess.Popen) -> int | None:
    """The pid of the `audit project` child that `audit serve` runs beside uvicorn."""
    found = projector_children(server.pid)
    assert len(found) <= 1, found
    return found[0] if found else None


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
    return value


def post_sample(base: str, secret: str, event_type: str) -> None:
    body = json.dumps(payload(event_type)).encode()
    svix_id = f"msg_{uuid.uuid4().hex}"
    answer = httpx.post(
        f"{base}/webhooks/clerk", content=body, headers=signed_headers(secret, svix_id, body)
    )
    assert answer.status_code == 200, answer.text


def projected_everything(base: str) -> bool:
    rows = httpx.get(
        f"{base}/v1/projections", headers={"Authorization": f"Bearer {API_TOKEN}"}
    ).json()["data"]
    return all(row["lag"] == 0 and row["position"] > 0 for row in rows)


def versions_of_user(base: str, user_id: str) -> int:
    answer = httpx.get(
        f"{base}/v1/users/{user_id}/history", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    return len(answer.json()["data"]) if answer.status_code == 200 else 0


def projectors_of_store(url: str) -> list[int]:
    """Every `audit project` process on this machine whose store is `url`."""
    found = []
    for process in live_processes():
        if PROJECT in process.command:
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
                if f"AUDIT_DATABASE_URL={url}".encode() in environ:
                    found.append(process.pid)
    return found


def serve_env(database: Database, secret: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "CLERK_"))}
    env.update(
        AUDIT_DATABASE_URL=database.url,
        CLERK_WEBHOOK_SIGNING_SECRET=secret,
        AUDIT_API_TOKENS=API_TOKEN,
    )
    return env


def test_serve_projects_in_a_child_it_restarts_and_stops(database: Database) -> None:
    secret = new_secret()
    with processes(serve_env(database, secret)) as running:
        base = running.serve("api").removesuffix("/webhooks/clerk")
        server = running.running["api"]
        first = wait_for(lambda: projector_of(server), "projector child")

        post_sample(base, secret, "user.created")
        user_id = payload("user.created")["data"]["id"]
        wait_for(lambda: projected_everything(base), "projected delivery")
        assert versions_of_user(base, user_id) == 1

        os.kill(first, signal.SIGKILL)
        wait_for(
            lambda: projector_of(server) not in (None, first) and projector_of(server),
            "restarted projector",
        )
        post_sample(base, secret, "user.updated")
        wait_for(lambda: projected_everything(base), "delivery projected by the restarted child")
        assert versions_of_user(base, user_id) == 2

        os.kill(server.pid, signal.SIGTERM)  # the server alone: it must stop its child itself
        server.wait(timeout=30)
        assert projectors_of_store(database.url) == []


def test_the_child_stops_by_itself_when_the_server_is_killed(database: Database) -> None:
    with processes(serve_env(database, new_secret())) as running:
        running.serve("api")
        server = running.running["api"]
        child = wait_for(lambda: projector_of(server), "projector child")
        assert projectors_of_store(database.url) == [child]
        os.kill(server.pid, signal.SIGKILL)  # no chance to stop its child
        server.wait(timeout=30)
        wait_for(lambda: not projectors_of_store(database.url), "orphan's exit", timeout=15)


def test_serve_without_projections_leaves_them_to_audit_project(database: Database) -> None:
    """SPEC 7: stateless API processes, with the projections in `audit project` processes."""
    secret = new_secret()
    env = serve_env(database, secret)
    with processes(env) as running:
        base = running.serve("api", "--no-projections").removesuffix("/webhooks/clerk")
        post_sample(base, secret, "user.created")
        assert projector_of(running.running["api"]) is None
        assert not projected_everything(base)
        once = subprocess.run(
            [*AUDIT, "project", "--once"], env=env, capture_output=True, text=True, timeout=60
        )
        assert once.returncode == 0, once.stderr
        # Deliveries, not the stored records (each has a marker) nor the sum of projections.
        assert "objects: applied 1 event, at position 2" in once.stdout.splitlines()
        assert projected_everything(base)
        assert versions_of_user(base, payload("user.created")["data"]["id"]) == 1


def test_the_workers_stop_by_themselves_when_the_server_is_killed(database: Database) -> None:
    """They went on taking webhooks with nothing projecting them, and held the port."""
    with processes(serve_env(database, new_secret())) as running:
        url = running.serve("api", workers=2)
        server = running.running["api"]
        workers = wait_for(lambda: workers_of(server.pid), "workers")
        os.kill(server.pid, signal.SIGKILL)  # the server alone, not its process group
        server.wait(timeout=30)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "exit")
        port = int(url.split(":")[2].split("/")[0])
        with socket.socket() as again:  # a restarted server could listen there
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))


def workers_of(server: int) -> list[int]:
    """The uvicorn workers of `audit serve --workers N` (spawned by multiprocessing)."""
    found = [p.pid for p in live_processes() if p.parent == server and "spawn_main" in p.command]
    return found if len(found) == 2 else []


def test_the_workers_write_the_access_log(database: Database, tmp_path: Path) -> None:
    """Spawned workers start with no logging set up: with --workers 2 the access log went
    nowhere and warnings came out bare (found by review)."""
    port = free_port()
    with open(tmp_path / "stderr", "wb") as stderr:
        server = subprocess.Popen(
            [*AUDIT, "serve", "--port", str(port), "--workers", "2", "--no-projections"],
            env=serve_env(database, new_secret()),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _answers(f"{base}/healthz"), "server")
            headers = {"Authorization": f"Bearer {API_TOKEN}"}
            assert httpx.get(f"{base}/v1/events?limit=1", headers=headers).status_code == 200
        finally:
            terminate(server)
    logged = (tmp_path / "stderr").read_text()
    assert re.search(r"^\S+ \S+ INFO audit\.access GET /v1/events 200 ", logged, re.M), logged


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False
