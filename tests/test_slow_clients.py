"""A slowloris body times out with 408 and holds nothing else up (real uvicorn, real sockets)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from api.app import create_app
from audit.application import AuditLog
from audit.config import Settings
from audit.samples import signed_headers


@contextmanager
def serving(app: ASGIApp, **config: Any) -> Iterator[str]:
    """uvicorn in a thread, on a socket bound here (no free port to race for); `config`: more
    of uvicorn's settings."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "uvicorn did not start within 20 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def server_url(settings: Settings, log: AuditLog) -> Iterator[str]:
    """A body must arrive within 0.5 s here, so a slowloris test needs no long wait."""
    with serving(create_app(settings, log, body_timeout=0.5)) as url:
        yield url


@pytest.fixture
def patient_server_url(settings: Settings, log: AuditLog) -> Iterator[str]:
    """The default body timeout: a big body on a loaded machine must meet the size limit,
    not the clock."""
    with serving(create_app(settings, log)) as url:
        yield url


def test_a_body_that_never_finishes_gets_408_while_others_are_served(server_url: str) -> None:
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as slow:
        slow.sendall(
            b"POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"svix-id: msg_slow\r\nsvix-timestamp: 1\r\nsvix-signature: v1,AAAA\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"type": "user.cr'
        )
        # The slow request is pending; the service still answers everyone else.
        assert httpx.get(f"{server_url}/healthz", timeout=5).status_code == 200
        answer = b""
        while b"}}" not in answer and (chunk := slow.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer


def test_huge_headers_are_refused_and_the_service_carries_on(server_url: str) -> None:
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as client:
        client.sendall(
            b"POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nX-Pad: "
            + b"a" * 200_000
            + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        answer = client.recv(4096)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert httpx.get(f"{server_url}/healthz", timeout=5).status_code == 200


def peak_rss_bytes() -> int:
    """The process's high-water mark of resident memory (the server runs in this process)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_memory_stays_bounded_under_10_mb_chunked_bodies(
    patient_server_url: str, secret: str
) -> None:
    """Twenty 10 MB bodies without Content-Length: each is cut off at the 1 MB limit as it
    streams, so the peak memory of the process does not grow by anything like 10 MB."""
    chunk = b"a" * 65536

    def body() -> Iterator[bytes]:
        yield b'{"type": "x", "data": {"pad": "'
        for _ in range(10_000_000 // len(chunk)):
            yield chunk

    before = peak_rss_bytes()
    with httpx.Client(timeout=30) as client:
        for _ in range(20):
            headers = signed_headers(secret, "msg_big", b"x")
            try:
                response = client.post(
                    f"{patient_server_url}/webhooks/clerk", content=body(), headers=headers
                )
                assert response.status_code == 413
            except httpx.TransportError:
                pass  # the server may close the connection as soon as it has answered
    assert peak_rss_bytes() - before < 8_000_000
