"""Realistic Clerk deliveries for domain tests, built from the reference payloads.

Every delivery starts as a deep copy of a real payload file, so tests exercise the shapes Clerk
sends (nested user objects in sessions, deletion stubs, identified e-mail lists) and only the ids,
fields and times a test cares about are changed.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from audit.aggregates.delivery import Delivery, parse_delivery

# The package bundles the reference payloads (audit/samples), so the tests need nothing outside.
_BUNDLED = Path(__file__).parent.parent / "audit" / "samples"
PAYLOADS_DIR = Path(os.environ.get("CLERK_PAYLOADS_DIR") or _BUNDLED)

USER_ID = "user_3XIOWrI57CYv83K9cu9aN3gSz5Q"
ORG_ID = "org_3UByhZomz62ag88bTkeSUIU5gEC"


@cache
def _raw(event_type: str) -> str:
    return (PAYLOADS_DIR / f"{event_type}.json").read_text(encoding="utf-8")


def payload_types() -> list[str]:
    """Every event type with a reference payload."""
    return sorted(p.stem for p in PAYLOADS_DIR.glob("*.json") if p.stem != "INDEX")


def envelope(event_type: str, *, timestamp: int | None = None, **data: Any) -> dict[str, Any]:
    """A fresh copy of the reference envelope of `event_type`, with `data` keys replaced."""
    result = copy.deepcopy(json.loads(_raw(event_type)))
    if timestamp is not None:
        result["timestamp"] = timestamp
    result["data"].update(copy.deepcopy(data))
    return result


def delivery(body: dict[str, Any], *, svix_id: str, received_at: int | None = None) -> Delivery:
    """A Delivery read from the bytes of `body`, as the intake would read it."""
    timestamp = body.get("timestamp")
    received = received_at if received_at is not None else (timestamp or 0) + 250
    return parse_delivery(
        json.dumps(body).encode(),
        svix_id=svix_id,
        svix_timestamp=received // 1000,
        received_at=received,
    )


def sample(
    event_type: str, *, svix_id: str | None = None, timestamp: int | None = None, **data: Any
) -> Delivery:
    """The reference payload of `event_type` as a Delivery (a svix id derived from the type)."""
    body = envelope(event_type, timestamp=timestamp, **data)
    return delivery(body, svix_id=svix_id or f"msg_{event_type}")


def email_address(element_id: str, address: str, *, status: str = "verified") -> dict[str, Any]:
    """An element of a user's `email_addresses`, shaped like the reference one."""
    element = copy.deepcopy(envelope("user.created")["data"]["email_addresses"][0])
    element.update({"id": element_id, "email_address": address})
    element["verification"]["status"] = status
    return element
