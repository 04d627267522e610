"""A Clerk webhook delivery as the domain sees it, and how to read one from raw bytes."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from audit.aggregates.changes import MAX_FIELD_LENGTH, field_path
from audit.aggregates.routing import related_ids
from audit.jsontext import dumps, is_unicode, loads
from audit.timeparse import epoch_ms


class InvalidPayload(ValueError):
    """The body is not a Clerk envelope (a JSON object with a string `type` and object `data`)."""


@dataclass(frozen=True)
class Delivery:
    """One verified webhook delivery, exactly as it will be stored.

    `body` is the raw request body decoded from UTF-8: encoding it again gives the signed bytes
    back, so it is a lossless copy. Everything else is read from it or from the delivery's headers.
    `signature` is the delivery's signature header as verified on receipt (its well-formed
    entries), kept so that `audit verify` can check the body against it again later; None for
    deliveries recorded before it was kept, or not received over HTTP.
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
    # Receipt metadata, not the delivery: a redelivery of the same body is signed anew.
    signature: str | None = field(default=None, compare=False, repr=False)

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


def _finite_float(text: str) -> float:
    """`json` reads 1e400 as infinity, which no JSON text can be written back as."""
    value = float(text)
    if math.isinf(value):
        raise InvalidPayload("the body has a number too large for a float")
    return value


# How `json` reads a body, where it reads one (`loads` passes them on).
_READING: dict[str, Any] = {"parse_constant": _reject_constant, "parse_float": _finite_float}

# A lone surrogate (`"\ud800"`) can only come from an escape, since the body is valid UTF-8.
# It is not Unicode text: nothing could hash, index or send it back, so it is refused. orjson
# refuses it while reading; `json`, which reads what orjson does not, takes it, hence the walk,
# done only when the text holds such an escape at all (paired ones, emoji, are common).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

# Clerk ids, types and IP addresses are a few dozen characters. The read models index them
# (B-tree entries are limited to about 2.7 KB on PostgreSQL): a longer one would fail every
# write of its delivery, and a rebuild's indexing at its switch.
MAX_CLERK_ID_LENGTH = 256


def _holds_lone_surrogate(value: Any) -> bool:
    pending = [value]  # a loop, not recursion: the body may nest as deep as `json` reads
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not is_unicode(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


# Clerk's payloads nest six levels or so, but metadata is the customer's JSON, and a user may
# write their own `unsafe_metadata` from the browser: refusing a deep body (as releases before
# 2026-12-06 did) let a user make their own later `user.updated` deliveries unrecordable. The
# projections' diffing recurses two frames a level, and orjson writes 254 levels at most, so what
# lies deeper than MAX_NESTING is read as the JSON text it is (`read_envelope`): the store keeps
# the body as signed, and every reading of it agrees.
MAX_NESTING = 256
_STRUCTURE = re.compile(r'[\\"\[\]{}]')


def read_envelope(text: str, **reading: Any) -> Any:
    """The value of a delivery's body, each array or object nested deeper than MAX_NESTING
    levels read as a string of its own text."""
    return loads(_split_deep(text)[0], **reading)


def _split_deep(text: str) -> tuple[str, list[str]]:
    """`_levels_split(text, MAX_NESTING)`; for a body with no more brackets than that (nearly
    every one), which cannot nest that deep, `text` itself and no parts, without a scan."""
    if text.count("{") + text.count("[") <= MAX_NESTING:
        return text, []
    return _levels_split(text, MAX_NESTING)


def _levels_split(text: str, limit: int) -> tuple[str, list[str]]:
    """`text` with each array or object that opens at level `limit + 1` replaced by a JSON
    string holding its text; and the text of each array or object opening at level `limit + 1`,
    `2 * limit + 1` ... with those it holds at the next such level replaced by `0`, so that
    `text` is valid JSON if and only if the first and every one of these are, each read once.
    (A loop over the brackets and quotes, not a parser: no recursion, any depth.)"""
    top: list[str] = []  # the first text
    nested: list[list[str]] = []  # the pieces of each level's part being read
    parts: list[str] = []
    depth, opened, last, last_top, skip_to = 0, 0, 0, 0, -1
    in_string = False
    for found in _STRUCTURE.finditer(text):
        at = found.start()
        if at < skip_to:
            continue  # the character a backslash escapes
        char = text[at]
        if in_string:
            if char == "\\":
                skip_to = at + 2
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth % limit == 1 and depth > limit:
                if nested:
                    nested[-1].append(text[last:at])
                nested.append([])
                last = at
                if depth == limit + 1:
                    opened = at
        elif char in "]}":
            if depth % limit == 1 and depth > limit and nested:
                nested[-1].append(text[last : at + 1])
                parts.append("".join(nested.pop()))
                if nested:
                    nested[-1].append("0")
                last = at + 1
                if depth == limit + 1:
                    top += [text[last_top:opened], dumps(text[opened : at + 1])]
                    last_top = at + 1
            depth -= 1
    top.append(text[last_top:])
    return "".join(top), parts


def parse_delivery(
    body: bytes,
    *,
    svix_id: str,
    svix_timestamp: int,
    received_at: int,
    signature: str | None = None,
) -> Delivery:
    """Read a verified body into a Delivery, or raise InvalidPayload."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload("the body is not valid UTF-8") from exc
    read, deeper = _split_deep(text)
    try:
        envelope = loads(read, **_READING)
        # What lies deeper is read as text, but checked as JSON by the same rules.
        values = [envelope, *(loads(part, **_READING) for part in deeper)]
    except InvalidPayload:
        raise
    except (ValueError, RecursionError) as exc:  # deep and unbalanced: no JSON either
        raise InvalidPayload("the body is not valid JSON") from exc
    if _SURROGATE_ESCAPE.search(text) and any(map(_holds_lone_surrogate, values)):
        raise InvalidPayload("the body has a lone UTF-16 surrogate, which is not Unicode text")
    if not isinstance(envelope, dict):
        raise InvalidPayload("the body is not a JSON object")
    event_type = envelope.get("type")
    data = envelope.get("data")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidPayload("the body has no string 'type'")
    if not isinstance(data, dict):
        raise InvalidPayload("the body has no object 'data'")
    if any(len(clerk_id) > MAX_CLERK_ID_LENGTH for clerk_id in related_ids(event_type, data)):
        raise InvalidPayload(f"the body names an id longer than {MAX_CLERK_ID_LENGTH} characters")
    if len(event_type) > MAX_CLERK_ID_LENGTH:
        raise InvalidPayload(f"the body's type is longer than {MAX_CLERK_ID_LENGTH} characters")
    # Clerk's own field names: a change path starts with one (audit.aggregates.changes). An
    # escaped key is at most twice as long: the exact test only runs past half the limit.
    if max(map(len, data), default=0) > MAX_FIELD_LENGTH // 2 and any(
        len(field_path([key])) > MAX_FIELD_LENGTH for key in data
    ):
        raise InvalidPayload(
            f"the body's data has a field name longer than {MAX_FIELD_LENGTH} characters"
        )
    attributes = envelope.get("event_attributes")
    client_ip = http_request_of(attributes if isinstance(attributes, dict) else None).get(
        "client_ip"
    )
    if isinstance(client_ip, str) and len(client_ip) > MAX_CLERK_ID_LENGTH:
        raise InvalidPayload(
            f"the body's client_ip is longer than {MAX_CLERK_ID_LENGTH} characters"
        )
    occurred_at = epoch_ms(envelope.get("timestamp"))
    instance_id = envelope.get("instance_id")
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
        signature=signature,
    )


def http_request_of(event_attributes: dict[str, Any] | None) -> dict[str, Any]:
    """The HTTP request behind an event, as Clerk reports it (`event_attributes.http_request`),
    or {} when it reports none."""
    request = (event_attributes or {}).get("http_request")
    return request if isinstance(request, dict) else {}


def delivery_from_record(record: dict[str, Any]) -> Delivery:
    """Rebuild a Delivery from the fields a stored event keeps (the body is re-parsed)."""
    envelope = read_envelope(record["body"])
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
        signature=record["signature"],
    )
