"""Hostile input on the webhook (issue 7, quick version): never a 5xx, nothing half-written, and
what is recorded still projects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from audit.aggregates.delivery import MAX_NESTING, Delivery, parse_delivery
from audit.aggregates.routing import StreamKind, stream_id
from audit.application import AuditLog
from audit.cursors import encode_cursor
from audit.integrity import verify_store
from audit.projections.runner import Projector
from audit.samples import signed_headers
from tests.conftest import API_TOKEN
from tests.test_read_api import cursor_contents
from tests.webhook_helpers import new_svix_id, payload, post

CLIENT_ERRORS = {400, 401, 409, 413}
FUZZ = settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@FUZZ
@given(body=st.binary(max_size=2000), signed=st.booleans())
def test_random_bytes_never_5xx(client: TestClient, secret: str, body: bytes, signed: bool) -> None:
    svix_id = new_svix_id()
    try:
        headers = signed_headers(secret, svix_id, body) if signed else None
    except UnicodeDecodeError:
        headers = None
    headers = headers or {
        "svix-id": svix_id,
        "svix-timestamp": "1",
        "svix-signature": "v1,AAAA",
    }
    response = client.post("/webhooks/clerk", content=body, headers=headers)
    assert response.status_code in CLIENT_ERRORS, response.text


@FUZZ
@given(
    header_values=st.dictionaries(
        st.sampled_from(["svix-id", "svix-timestamp", "svix-signature", "content-length"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
    )
)
def test_random_headers_never_5xx(client: TestClient, secret: str, header_values) -> None:
    raw = json.dumps(payload("user.created")).encode()
    headers = signed_headers(secret, new_svix_id(), raw)
    headers.update(header_values)
    response = client.post("/webhooks/clerk", content=raw, headers=headers)
    assert response.status_code in CLIENT_ERRORS | {200}, response.text


@FUZZ
@given(data=json_values, event_type=st.text(min_size=1, max_size=40))
def test_signed_odd_envelopes_record_and_project(
    client: TestClient, log: AuditLog, secret: str, data, event_type: str
) -> None:
    envelope = {
        "type": event_type,
        "data": data if isinstance(data, dict) else {"value": data},
        "timestamp": data if isinstance(data, int) else 1716883200018,
        "event_attributes": {"http_request": {"client_ip": "\u0000", "user_agent": 2**70}},
    }
    response = post(client, secret, envelope)
    assert response.status_code == 200, response.text
    projector = Projector(log)
    projector.run_once()
    assert all(row["errors"] == 0 and row["lag"] == 0 for row in projector.status())


# Metadata is the customer's JSON: any shape, keys that look like secrets or like paths.
_KEYS = st.sampled_from(["otp_code", "a", "url", "a.b", "", "id"])
_metadata = st.dictionaries(
    _KEYS,
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(alphabet="ab", max_size=3),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(_KEYS, children),
        max_leaves=8,
    ),
)


def _with_codes(value: Any, codes: list[str]) -> Any:
    """`value` with a fresh code at every otp_code key (kept in `codes`): the code itself where
    a scalar was, inside an object where an object or a list was."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if key == "otp_code":
                codes.append(f"7{len(codes):07d}")  # 8 digits: no sample holds such a run
                item = {"code": codes[-1]} if isinstance(item, dict | list) else codes[-1]
            result[key] = _with_codes(item, codes)
        return result
    if isinstance(value, list):
        return [_with_codes(item, codes) for item in value]
    return value


@settings(
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(before=_metadata, after=_metadata)
@example(before={"otp_code": {}}, after={"a": [{"otp_code": 1}]})
@example(before={}, after={"a.b": {"otp_code": 1}, "a": {"b": {"otp_code": 2}}})
def test_any_metadata_reads_back_without_a_5xx_or_a_code(
    client: TestClient, log: AuditLog, secret: str, before: Any, after: Any
) -> None:
    """A user's private metadata changes from one random shape to another: every page about
    that user answers, and no code put under an otp_code key, at any depth, is in any of them
    (SPEC 3)."""
    codes: list[str] = []
    user = payload("user.created")["data"]
    user_id = f"user_{new_svix_id()}"
    bodies = []
    created = 1716883200000  # 2024-05-28T08:00:00Z
    for event_type, metadata, at in (
        ("user.created", before, created),
        ("user.updated", after, created + 1),
    ):
        envelope = payload(event_type)
        envelope["timestamp"] = at
        envelope["data"] = dict(user, id=user_id, updated_at=at)
        envelope["data"]["private_metadata"] = _with_codes(metadata, codes)
        assert post(client, secret, envelope).status_code == 200
    Projector(log).run_once()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for path, params in (
        (f"/v1/users/{user_id}", {}),
        (f"/v1/users/{user_id}", {"as_of": "2024-05-28T08:00:00.000Z"}),
        (f"/v1/users/{user_id}/history", {}),
        ("/v1/changes", {"subject": user_id}),
        ("/v1/changes", {"subject": user_id, "format": "csv"}),
        ("/v1/events", {"subject": user_id}),
        ("/v1/events", {"subject": user_id, "format": "ndjson"}),
    ):
        response = client.get(path, params=params, headers=auth)
        assert response.status_code == 200, (path, params, response.text)
        bodies.append(response.text)
    assert not [code for code in codes if any(code in body for body in bodies)], bodies
    assert all(row["errors"] == 0 for row in Projector(log).status())


def test_deeply_nested_json_is_400(client: TestClient, secret: str) -> None:
    raw = b'{"type": "user.created", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = post(client, secret, raw)
    assert response.status_code == 400


def test_ten_megabytes_is_413_before_reading(client: TestClient, secret: str) -> None:
    raw = b'{"type": "x", "data": {"pad": "' + b"a" * 10_000_000 + b'"}}'
    response = post(client, secret, raw)
    assert response.status_code == 413


def test_nul_bytes_and_huge_numbers_in_a_real_payload(
    client: TestClient, log: AuditLog, secret: str
) -> None:
    envelope = payload("user.updated")
    envelope["data"]["id"] = "user_\u0000nul"
    envelope["data"]["first_name"] = "a\u0000b"
    envelope["data"]["updated_at"] = 2**70
    envelope["timestamp"] = -(2**70)
    assert post(client, secret, envelope).status_code == 200
    assert post(client, secret, b'{"type": "x", "data": {"a": "\x00"}}').status_code == 400
    projector = Projector(log)
    projector.run_once()
    assert all(row["errors"] == 0 and row["lag"] == 0 for row in projector.status())
    # The read API gives the huge number back exactly (not as a float), in JSON and ndjson.
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for params in ({"type": "user.updated"}, {"type": "user.updated", "format": "ndjson"}):
        response = client.get("/v1/events", params=params, headers=auth)
        assert response.status_code == 200, response.text
        assert '"updated_at":1180591620717411303424' in response.text
    # An event's data is read from the event store, which keeps what was signed: the NUL too.
    response = client.get("/v1/events", params={"type": "user.updated"}, headers=auth)
    [event] = response.json()["data"]
    assert event["data"]["id"] == "user_\u0000nul" and event["data"]["first_name"] == "a\u0000b"
    assert client.get(f"/v1/events/{event['id']}", headers=auth).json()["data"] == event["data"]
    # So does the envelope around it, on either backend (PostgreSQL served U+FFFD here).
    assert event["subject"]["id"] == "user_\u0000nul"
    odd = {"type": "x.\u0000y", "instance_id": "ins_\u0000", "data": {"id": "x_\u0000"}}
    odd["event_attributes"] = {"http_request": {"client_ip": "10.0.0.\u0000"}}
    assert post(client, secret, odd).status_code == 200
    projector.run_once()
    [event] = [
        e
        for e in client.get("/v1/events", headers=auth).json()["data"]
        if e["type"] != "user.updated"
    ]
    assert (event["type"], event["instance_id"], event["subject"]["id"], event["actor"]["ip"]) == (
        "x.\u0000y",
        "ins_\u0000",
        "x_\u0000",
        "10.0.0.\u0000",
    )
    # PostgreSQL text cannot hold NUL: the read models keep U+FFFD in its place (JSON values
    # keep their escaped \u0000). SQLite keeps the NUL.
    response = client.get("/v1/changes", params={"field": "first_name"}, headers=auth)
    assert response.status_code == 200, response.text
    [change] = [c for c in response.json()["data"] if c["to"] == "a\u0000b"]
    nul = "\ufffd" if log.db.dialect == "postgresql" else "\u0000"
    assert change["subject"]["id"] == change["owner_id"] == f"user_{nul}nul"


@pytest.mark.parametrize("status", [5, 2**70, ["active"], {"state": "active"}])
def test_values_of_the_wrong_type_in_text_columns_still_project(
    client: TestClient, log: AuditLog, secret: str, status: Any
) -> None:
    """A session whose `status` is a number: PostgreSQL's binary COPY refuses a number for a
    text column; the view keeps the number. A list or an object failed the projection
    (unhashable), and on SQLite so did a number past 64 bits (found by review)."""
    envelope = payload("session.created")
    envelope["data"]["status"] = status
    assert post(client, secret, envelope).status_code == 200
    projector = Projector(log)
    projector.run_once()
    assert all(row["errors"] == 0 and row["lag"] == 0 for row in projector.status())
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    user_id, session_id = envelope["data"]["user_id"], envelope["data"]["id"]
    response = client.get(f"/v1/users/{user_id}/sessions", headers=auth)
    assert response.status_code == 200, response.text
    [session] = [s for s in response.json()["data"] if s["id"] == session_id]
    assert session["status"] == status


def test_a_body_nested_deeper_than_the_limit_is_recorded_and_read(
    client: TestClient, log: AuditLog, secret: str
) -> None:
    """Refused with 400 until 2026-12-06, which let a user write `unsafe_metadata` deep enough
    (from the browser) that their own later `user.updated` deliveries could never be recorded
    (found by review). Recorded as signed; read, projected and rendered with what lies past
    MAX_NESTING as text, at any depth (orjson's 1,024 and `json`'s 1,000 included)."""
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for depth in (MAX_NESTING, 1000, 5000):
        user_id = f"user_{new_svix_id()}"
        envelope = payload("user.updated")
        envelope["data"] = dict(envelope["data"], id=user_id, unsafe_metadata="DEEP")
        deep = '{"a": ' * depth + "1" + "}" * depth
        raw = json.dumps(envelope).replace('"DEEP"', deep).encode()
        svix_id = new_svix_id()
        response = post(client, secret, raw, svix_id=svix_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "recorded"
        projector = Projector(log)
        projector.run_once()
        assert all(row["errors"] == 0 and row["lag"] == 0 for row in projector.status())
        event = client.get(f"/v1/events/{svix_id}", headers=auth)
        assert event.status_code == 200, event.text[:200]
        value, levels = event.json()["data"]["unsafe_metadata"], 3  # the envelope, data, it
        while isinstance(value, dict):
            value, levels = value["a"], levels + 1
        assert levels == MAX_NESTING + 1  # the first level read as text
        assert value == '{"a": ' * (depth - levels + 3) + "1" + "}" * (depth - levels + 3)
        for path in (f"/v1/users/{user_id}", f"/v1/users/{user_id}/history"):
            assert client.get(path, headers=auth).status_code == 200, path
    assert verify_store(log).ok  # each stored field is what the body says, read the same way


CREATED = 1716883200000  # 2024-05-28T08:00:00Z


def _user_versions_recorded(
    client: TestClient, log: AuditLog, secret: str, user_id: str, *data: dict[str, Any]
) -> list[dict[str, Any]]:
    """A sample user created with the first `data`, updated with each next one a millisecond
    later, and projected without an error: its history as the API answers it."""
    user = payload("user.created")["data"]
    for n, fields in enumerate(data):
        envelope = payload("user.created" if n == 0 else "user.updated")
        envelope["timestamp"] = CREATED + n
        envelope["data"] = dict(user, id=user_id, updated_at=CREATED + n, **fields)
        assert post(client, secret, envelope).status_code == 200
    projector = Projector(log)
    projector.run_once()
    assert all(row["errors"] == 0 and row["lag"] == 0 for row in projector.status())
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    return client.get(f"/v1/users/{user_id}/history", headers=auth).json()["data"]


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


def test_metadata_nested_to_the_limit_is_recorded_projected_and_read(
    client: TestClient, log: AuditLog, secret: str
) -> None:
    """Every read of a user whose metadata nests as deep as a body may, on both backends (at
    600 levels the version's diff hit the recursion limit: no history, a projection error)."""
    user_id = f"user_{new_svix_id()}"
    depth = MAX_NESTING - 2  # the envelope and `data` are two levels
    history = _user_versions_recorded(
        client,
        log,
        secret,
        user_id,
        {"unsafe_metadata": _nested(depth, 1)},
        {"unsafe_metadata": _nested(depth, 2)},
    )
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    [change] = [c for c in history[1]["changes"] if c["field"].startswith("unsafe_metadata")]
    # Whole at its longest ancestor that fits: "unsafe_metadata" and 120 of the ".a".
    assert change["field"] == "unsafe_metadata" + ".a" * 120
    assert (change["from"], change["to"]) == (_nested(depth - 120, 1), _nested(depth - 120, 2))
    for path, params in (
        (f"/v1/users/{user_id}", {}),
        (f"/v1/users/{user_id}", {"as_of": CREATED}),
        ("/v1/changes", {"subject": user_id, "format": "csv"}),
        ("/v1/events", {"subject": user_id, "format": "ndjson"}),
    ):
        response = client.get(path, params=params, headers=auth)
        assert response.status_code == 200, (path, params, response.text[:200])


def test_a_non_ascii_content_length_is_400(client: TestClient, secret: str) -> None:
    """'²' passes str.isdigit() but not int(): found in the time parameters, guarded here too.
    Sent over raw ASGI: HTTP clients (and h11) would not pass such a header on."""
    raw = json.dumps(payload("user.created")).encode()
    headers = {**signed_headers(secret, new_svix_id(), raw), "content-length": "\u00b2"}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/webhooks/clerk",
        "raw_path": b"/webhooks/clerk",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(client.app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 400, body
    assert json.loads(body)["error"]["code"] == "invalid_headers"


@pytest.mark.parametrize("one_batch", [False, True])
def test_nul_bytes_in_the_ids_of_a_sub_object_and_its_organization(
    client: TestClient, log: AuditLog, secret: str, one_batch: bool
) -> None:
    """The owner index is written with the append, and PostgreSQL text cannot hold a NUL: such
    a domain once answered 500 for ever. Its stub names no organization, and goes to a stream of
    its own on both backends, whether it came in the same batch or later."""
    created = payload("organizationDomain.created")
    created["data"]["id"] = "orgdmn_\u0000nul"
    created["data"]["organization_id"] = "org_\u0000nul"
    deleted = payload("organizationDomain.deleted")
    deleted["data"]["id"] = "orgdmn_\u0000nul"
    if one_batch:
        log.record([delivery_of(created, "msg_nul_1"), delivery_of(deleted, "msg_nul_2")])
    else:
        assert post(client, secret, created).status_code == 200
        assert post(client, secret, deleted).status_code == 200

    def types_in(kind: StreamKind, clerk_id: str) -> list[str]:
        return [event.delivery().type for event in log.stream_events(stream_id(kind, clerk_id))]

    assert types_in("organization", "org_\0nul") == ["organizationDomain.created"]
    assert types_in("subject", "orgdmn_\0nul") == ["organizationDomain.deleted"]
    projector = Projector(log)
    projector.run_once()
    assert all(row["errors"] == 0 and row["lag"] == 0 for row in projector.status())


def delivery_of(envelope: dict[str, Any], svix_id: str) -> Delivery:
    body = json.dumps(envelope).encode()
    return parse_delivery(body, svix_id=svix_id, svix_timestamp=1, received_at=1)


def _with_data(event_type: str, **data: Any) -> bytes:
    envelope = payload(event_type)
    envelope["data"].update(data)
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    "body",
    [
        # A lone surrogate: no stream id can be derived from it (a 500 for its whole batch).
        _with_data("user.updated", id="user_\ud800"),
        _with_data("user.updated", first_name="Ada\udfff"),
        # Infinity: recorded, then written out as `Infinity`, which is not JSON.
        b'{"type": "user.created", "data": {"id": "user_inf", "x": 1e999}}',
        # An id past PostgreSQL's B-tree entry limit: 503 for ever there, on every retry.
        _with_data("organizationDomain.created", id="dmn_" + "x" * 3000),
        _with_data("session.created", user_id="user_" + "x" * 3000),
        # Indexed by the read models: a rebuild's switch could never create their indexes.
        json.dumps({**payload("user.updated"), "type": "user." + "x" * 3000}).encode(),
        json.dumps(
            {
                **payload("user.updated"),
                "event_attributes": {"http_request": {"client_ip": "f" * 4000}},
            }
        ).encode(),
        # Where every change path of the object starts (Clerk's own names are short).
        _with_data("user.updated", **{"n" * 257: 1}),
        _with_data("user.updated", **{"." * 129: 1}),  # 258 characters escaped
    ],
    ids=[
        "surrogate-id",
        "surrogate-value",
        "infinity",
        "long-domain-id",
        "long-user-id",
        "long-type",
        "long-client-ip",
        "long-data-key",
        "long-data-key-escaped",
    ],
)
def test_a_body_no_store_could_give_back_is_400_and_nothing_is_stored(
    client: TestClient, log: AuditLog, secret: str, body: bytes
) -> None:
    before = log.recorder.max_notification_id()
    response = post(client, secret, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_payload"
    assert log.recorder.max_notification_id() == before
    assert post(client, secret, payload("session.created")).status_code == 200


def test_metadata_keys_with_dots_too_long_to_index_or_named_object_are_changes(
    client: TestClient, log: AuditLog, secret: str
) -> None:
    """End users write `unsafe_metadata`. A key `a.b` beside an object `a` with a `b` gave two
    changes one field, and a key of thousands of characters a field PostgreSQL cannot index:
    either made the version's changes unrecordable (a projection error, nothing in history)."""
    user_id = f"user_{new_svix_id()}"
    long_key = "".join(f"{n:x}" for n in range(1500))  # 4,000 characters, hardly compressible
    code = "73519864"
    metadata = {
        "unsafe_metadata": {"a.b": "dotted", "a": {"b": "nested"}},
        "private_metadata": {"plan": "pro", long_key: {"otp_code": code}},
        "public_metadata": {"object": "server"},  # the customer's field, not Clerk's type
    }
    history = _user_versions_recorded(client, log, secret, user_id, {}, metadata)
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    assert [entry["type"] for entry in history] == ["user.created", "user.updated"]
    assert {c["field"]: c["to"] for c in history[1]["changes"] if "metadata" in c["field"]} == {
        "unsafe_metadata.a.b": "nested",
        "unsafe_metadata.a\\.b": "dotted",
        "public_metadata.object": "server",
        # Whole, at its longest ancestor that fits; the code under it redacted.
        "private_metadata": {"plan": "pro", long_key: {"otp_code": "[redacted]"}},
    }
    for field, value in (("unsafe_metadata.a\\.b", "dotted"), ("unsafe_metadata.a.b", "nested")):
        found = client.get("/v1/changes", params={"field": field}, headers=auth).json()["data"]
        assert [(c["subject"]["id"], c["to"]) for c in found] == [(user_id, value)]
    exported = client.get("/v1/changes", params={"subject": user_id, "format": "csv"}, headers=auth)
    assert exported.status_code == 200 and long_key in exported.text
    assert code not in exported.text and code not in json.dumps(history)


def test_metadata_keys_with_a_nul_and_its_stand_in_do_not_hide_the_users_later_updates(
    client: TestClient, log: AuditLog, secret: str
) -> None:
    """PostgreSQL text holds U+FFFD for a NUL, so keys `a\\x00` and `a\\ufffd` written by an
    end user were one change path there: the version's change rows collided, and it and every
    later version of that user (an admin's role grant) were set aside as poison, on PostgreSQL
    alone (QA). Each key is its own field, on both backends, and `field=` finds it."""
    user_id = f"user_{new_svix_id()}"
    history = _user_versions_recorded(
        client,
        log,
        secret,
        user_id,
        {},
        {"unsafe_metadata": {"a\x00": 1, "a\ufffd": 2}},
        {"unsafe_metadata": {"a\x00": 1, "a\ufffd": 2}, "public_metadata": {"role": "admin"}},
    )
    assert [entry["type"] for entry in history] == ["user.created", *["user.updated"] * 2]
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    state = client.get(f"/v1/users/{user_id}", headers=auth).json()
    assert state["data"]["public_metadata"] == {"role": "admin"}
    for field, value in (
        ("unsafe_metadata.a\\0", 1),
        ("unsafe_metadata.a\ufffd", 2),
        ("public_metadata", "admin"),
    ):
        found = client.get("/v1/changes", params={"field": field}, headers=auth).json()["data"]
        assert [(c["subject"]["id"], c["to"]) for c in found] == [(user_id, value)], field


@pytest.mark.parametrize(
    "lookalike",
    [
        {"_type_": "nope", "_data_": 1},  # no such transcoding: the record could not be read
        {"_type_": "datetime_iso", "_data_": "2024-01-01T00:00:00"},  # read back as a datetime
        {"_type_": "nope", "_data_": 1.5},  # a float: read by `json`, hook and all
    ],
)
def test_event_attributes_shaped_like_a_stored_type_are_read_back_as_sent(
    client: TestClient, log: AuditLog, secret: str, lookalike: dict[str, Any]
) -> None:
    """The store's JSON marks its own types as `{"_type_": ..., "_data_": ...}`. A signed
    delivery's `event_attributes` holding that shape was recorded (200), then failed every read
    of its record: its stream's `as_of` answered 500, the projections counted an error and the
    event was missing from /v1/events (review C)."""
    user = dict(payload("user.created")["data"], id=f"user_{new_svix_id()}")
    body = dict(payload("user.created"), data=user)
    body["event_attributes"] = {"http_request": {"client_ip": "192.0.2.1", "extra": lookalike}}
    svix_id = new_svix_id()
    assert post(client, secret, body, svix_id=svix_id).json()["status"] == "recorded"
    projector = Projector(log)
    projector.run_once()
    assert [row["errors"] for row in projector.status()] == [0, 0, 0], projector.status()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    event = client.get(f"/v1/events/{svix_id}", headers=auth)
    assert event.status_code == 200, event.text
    as_of = {"as_of": body["timestamp"]}
    state = client.get(f"/v1/users/{user['id']}", params=as_of, headers=auth)
    assert state.status_code == 200, state.text
    position = event.json()["position"]
    record = log.db.fetchone(
        f"SELECT originator_id, originator_version, topic, state FROM"
        f" {log.db.table(log.db.events_table)} WHERE {log.db.position_column} = %s",
        [position],
    )
    delivery = log.stored_delivery({**dict(record), "position": position})
    assert delivery.event_attributes == body["event_attributes"]


def test_walks_pass_ids_that_hold_a_nul(client: TestClient, log: AuditLog, secret: str) -> None:
    """Cursors were refused when their key held a NUL, which a key read from SQLite's rows
    keeps: a walk of /v1/changes stopped at the first such id with 400 invalid_cursor
    (review C). PostgreSQL's rows hold U+FFFD there; a cursor made on either reads on."""
    user_ids = ["user_nulWalkA", "user_nulWalk\u0000B", "user_nulWalkC"]
    for user_id in user_ids:
        for event_type, name in (("user.created", "Ada"), ("user.updated", "Grace")):
            envelope = payload(event_type)
            envelope["data"].update(id=user_id, first_name=name)
            assert post(client, secret, envelope).status_code == 200
        session = payload("session.created")
        session["data"].update(id=f"sess_of\u0000{user_id}", user_id=user_ids[0])
        assert post(client, secret, session).status_code == 200
    Projector(log).run_once()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for path, params in (
        ("/v1/changes", {"field": "first_name"}),
        ("/v1/events", {"type": "user.*"}),
        (f"/v1/users/{user_ids[0]}/sessions", {}),
    ):
        walked: list[Any] = []
        query: dict[str, Any] = {**params, "limit": 1}
        while True:
            page = client.get(path, params=query, headers=auth)
            assert page.status_code == 200, (path, len(walked), page.text)
            walked += page.json()["data"]
            if page.json()["next_cursor"] is None:
                break
            query["cursor"] = page.json()["next_cursor"]
            # A cursor whose key holds a NUL where the store holds U+FFFD, or the reverse,
            # is bound as the store can take it: never a 500.
            swapped = dict(query, cursor=_swap_nul(query["cursor"]))
            assert client.get(path, params=swapped, headers=auth).status_code == 200
        whole = client.get(path, params={**params, "limit": 500}, headers=auth).json()["data"]
        assert walked == whole, path
        assert len(walked) >= 3, (path, walked)


def _swap_nul(cursor: str) -> str:
    kind, values = cursor_contents(cursor)
    return encode_cursor(
        kind,
        [
            v.replace("\x00", "\x01").replace("\ufffd", "\x00").replace("\x01", "\ufffd")
            if isinstance(v, str)
            else v
            for v in values
        ],
    )
