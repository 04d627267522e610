"""Signing and posting deliveries in tests, with the real svix package."""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from httpx import Response
from starlette.testclient import TestClient

from audit.samples import signed_headers

PAYLOADS = Path(__file__).resolve().parents[2] / "shared" / "clerk" / "payloads"
if not PAYLOADS.is_dir():  # a checkout elsewhere: the bundled copy holds the same files
    PAYLOADS = Path(__file__).resolve().parents[1] / "audit" / "samples"


def payload_files() -> list[Path]:
    return sorted(p for p in PAYLOADS.glob("*.json") if p.name != "INDEX.json")


def payload(event_type: str) -> dict[str, Any]:
    return json.loads((PAYLOADS / f"{event_type}.json").read_text())


def new_svix_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def post(
    client: TestClient,
    secret: str,
    body: bytes | dict[str, Any],
    *,
    svix_id: str | None = None,
    when: datetime | None = None,
    header_set: str = "svix",
    extra_headers: dict[str, str] | None = None,
) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = signed_headers(secret, svix_id or new_svix_id(), raw, when)
    if header_set == "webhook":
        headers = {k.replace("svix-", "webhook-"): v for k, v in headers.items()}
    headers.update(extra_headers or {})
    return client.post("/webhooks/clerk", content=raw, headers=headers)


def seconds_ago(seconds: int) -> datetime:
    """Whole seconds from now: the header carries whole seconds, so start from a whole second."""
    return datetime.fromtimestamp(math.floor(time.time()) - seconds, tz=UTC)
