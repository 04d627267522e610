"""A Clerk webhook delivery as the domain sees it, and how to read one from raw bytes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from audit.jsontext import loads
from audit.timeparse import epoch_ms


class InvalidPayload(ValueError):
    """The body is not a Clerk envelope (a JSON object with a string `type` and object `data`)."""


@dataclass(frozen=True)
class Delivery:
    """One verified webhook delivery, exactly as it will be stored.

    `body` is the raw request body decoded from UTF-8: encoding it again gives the signed bytes
    back, so it is a lossless copy. Everything else is read from it or from the delivery's headers.
    """

    svix_id: str
    svix_timestamp: int
    type: str
    occurred_at: int | None
    instance_id: str | None
    event_attributes: dict[str, Any] | None
    received_at: int
    body: str
    sha256: str
    data: dict[str, Any] = field(compare=False, repr=False, hash=False)

    @property
    def subject_id(self) -> str | None:
        value = self.data.get("id")
        return value if isinstance(value, str) else None

    @property
    def subject_object(self) -> str | None:
        value = self.data.get("object")
        return value if isinstance(value, str) else None


def _reject_constant(name: str) -> Any:
    raise InvalidPayload(f"the body contains {name}, which is not JSON")


# A body with fewer opening brackets than this cannot nest deeper, and `json` reads that deep:
# such a body is read by `loads` (orjson mostly, three times as fast as `json` on a Clerk body).
# orjson reads nesting `json` refuses (1,024 levels against under 1,000), and the projections'
# diffing and the read API's redaction recurse as `json` does, so any deeper body is read by
# `json`, which says whether it is too deep.
MAX_BRACKETS_FOR_ORJSON = 256


def parse_delivery(body: bytes, *, svix_id: str, svix_timestamp: int, received_at: int) -> Delivery:
    """Read a verified body into a Delivery, or raise InvalidPayload."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload("the body is not valid UTF-8") from exc
    try:
        if body.count(b"{") + body.count(b"[") < MAX_BRACKETS_FOR_ORJSON:
            envelope = loads(text, parse_constant=_reject_constant)
        else:
            envelope = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise InvalidPayload("the body is nested too deeply") from exc
    except ValueError as exc:
        raise InvalidPayload("the body is not valid JSON") from exc
    if not isinstance(envelope, dict):
        raise InvalidPayload("the body is not a JSON object")
    event_type = envelope.get("type")
    data = envelope.get("data")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidPayload("the body has no string 'type'")
    if not isinstance(data, dict):
        raise InvalidPayload("the body has no object 'data'")
    occurred_at = epoch_ms(envelope.get("timestamp"))
    instance_id = envelope.get("instance_id")
    attributes = envelope.get("event_attributes")
    return Delivery(
        svix_id=svix_id,
        svix_timestamp=svix_timestamp,
        type=event_type,
        occurred_at=occurred_at,
        instance_id=instance_id if isinstance(instance_id, str) else None,
        event_attributes=attributes if isinstance(attributes, dict) else None,
        received_at=received_at,
        body=text,
        sha256=hashlib.sha256(body).hexdigest(),
        data=data,
    )


def delivery_from_record(record: dict[str, Any]) -> Delivery:
    """Rebuild a Delivery from the fields a stored event keeps (the body is re-parsed)."""
    envelope = loads(record["body"])
    return Delivery(
        svix_id=record["svix_id"],
        svix_timestamp=record["svix_timestamp"],
        type=record["type"],
        occurred_at=record["occurred_at"],
        instance_id=record["instance_id"],
        event_attributes=record["event_attributes"],
        received_at=record["received_at"],
        body=record["body"],
        sha256=record["sha256"],
        data=envelope["data"],
    )
