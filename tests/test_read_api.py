"""SPEC 4 / issue 5: the read API, on SQLite and PostgreSQL, over state built by the webhook.

Every sample payload (and a few deliveries of our own) goes in through `POST /webhooks/clerk`; the
projections run; then each route, filter, cursor, export, token rule and redaction rule is checked.
"""

from __future__ import annotations

import base64
import copy
import csv
import gc
import io
import ipaddress
import json
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from httpx import Response
from hypothesis import example, given
from hypothesis import strategies as st
from starlette.testclient import TestClient

from api import read
from api.app import READ_THREADS, create_app
from audit import application, queries
from audit.addresses import AddressFilter
from audit.aggregates.changes import diff, with_enclosing
from audit.application import AuditLog
from audit.config import Settings, parse_tokens
from audit.cursors import CursorError, decode_cursor, encode_cursor
from audit.projections import base
from audit.projections.base import Tables
from audit.projections.objects import ObjectsProjection
from audit.projections.runner import Projector, active_tables, reads_behind
from audit.redaction import (
    REDACTED,
    SECRET_BY_OBJECT,
    kind_of,
    redact,
    redact_change,
    redact_recorded_changes,
)
from audit.timeparse import MAX_EPOCH_MS, MIN_EPOCH_MS, TimeParseError, format_time, parse_time
from tests.conftest import API_TOKEN
from tests.webhook_helpers import new_svix_id, payload, payload_files, post

SAMPLE_USER = "user_3XIOWrI57CYv83K9cu9aN3gSz5Q"
SAMPLE_ORG = "org_3UByhZomz62ag88bTkeSUIU5gEC"
SUBSCRIPTION = "csub_3SqMLsLR2zzxp4dtesnZjpFKpUM"  # the sample subscription items' own
SAMPLE_SESSION = "sess_3nuW59H6KiTSqRrNmFSG0rZD6BO"
FRESH_USER = "user_2freshAuditReadApiTest01"
FRESH_SESSION = "sess_2freshAuditReadApiTest01"
FRESH_MEMBERSHIP = "orgmem_2freshAuditReadApiTest01"
FRESH_DOMAIN = "orgdmn_2freshAuditReadApiTest01"


class ObjectsRaised(ObjectsProjection):
    version = ObjectsProjection.version + 1


T_CREATED = 1_716_900_000_000
T_UPDATED = 1_716_900_600_000
UPDATE_IP = "203.0.113.7"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def _envelope(event_type: str, data: dict[str, Any], timestamp: int, ip: str) -> dict[str, Any]:
    body = copy.deepcopy(payload(event_type))
    body["data"] = data
    body["timestamp"] = timestamp
    body["event_attributes"] = {"http_request": {"client_ip": ip, "user_agent": "pytest"}}
    return body


def fresh_deliveries() -> list[dict[str, Any]]:
    """A user created then renamed, with a session, a membership and a domain of its own."""
    user = copy.deepcopy(payload("user.created")["data"])
    user.update(id=FRESH_USER, first_name="Ada", created_at=T_CREATED, updated_at=T_CREATED)
    renamed = dict(user, first_name="Grace", updated_at=T_UPDATED)
    session = copy.deepcopy(payload("session.created")["data"])
    session.update(id=FRESH_SESSION, user_id=FRESH_USER, created_at=T_CREATED, updated_at=T_CREATED)
    membership = copy.deepcopy(payload("organizationMembership.created")["data"])
    membership.update(
        id=FRESH_MEMBERSHIP, role="org:admin", created_at=T_CREATED, updated_at=T_CREATED
    )
    membership["public_user_data"]["user_id"] = FRESH_USER
    domain = copy.deepcopy(payload("organizationDomain.created")["data"])
    domain.update(id=FRESH_DOMAIN, name="fresh.example", created_at=T_CREATED, updated_at=T_CREATED)
    return [
        _envelope("user.created", user, T_CREATED, "198.51.100.1"),
        _envelope("user.updated", renamed, T_UPDATED, UPDATE_IP),
        _envelope("session.created", session, T_CREATED, "198.51.100.1"),
        _envelope("organizationMembership.created", membership, T_CREATED, "198.51.100.1"),
        _envelope("organizationDomain.created", domain, T_CREATED, "198.51.100.1"),
    ]


@dataclass
class World:
    client: TestClient
    projector: Projector
    log: AuditLog
    secret: str

    def get(
        self,
        path: str,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        *,
        auth: bool = True,
    ) -> Response:
        return self.client.get(
            path, params=params, headers={**(AUTH if auth else {}), **(headers or {})}
        )

    def ok(self, path: str, params: Any = None, **kwargs: Any) -> Any:
        response = self.get(path, params, **kwargs)
        assert response.status_code == 200, (path, params, response.text)
        return response.json()

    def deliver(self, body: dict[str, Any] | bytes) -> None:
        response = post(self.client, self.secret, body, svix_id=new_svix_id())
        assert response.status_code == 200, response.text

    def walk(self, path: str, params: Any = None, limit: int = 7) -> list[Any]:
        """Every item of a list, page by page (`params` a dict or a list of pairs)."""
        items: list[Any] = []
        cursor = None
        pairs = list(params.items()) if isinstance(params, dict) else list(params or [])
        for _ in range(10_000):
            query = [*pairs, ("limit", limit), *([("cursor", cursor)] if cursor else [])]
            page = self.ok(path, query)
            assert set(page) == {"data", "next_cursor"}
            assert len(page["data"]) <= limit
            items += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items
        raise AssertionError("the walk did not end")


@pytest.fixture
def world(settings: Settings, log: AuditLog, secret: str) -> Iterator[World]:
    projector = Projector(log)
    app = create_app(settings, log, projector=projector)
    with TestClient(app, raise_server_exceptions=False) as client:
        w = World(client, projector, log, secret)
        for path in payload_files():
            w.deliver(path.read_bytes())
        for body in fresh_deliveries():
            w.deliver(body)
        projector.run_once()
        yield w


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


# -- routes ---------------------------------------------------------------------------------------


def test_an_index_row_that_does_not_match_the_store_fails_loudly(world: World) -> None:
    """An event's payload is read from the event store by position: an index row the store does
    not back (tampered with, or from elsewhere) must be an error, never another event's data or
    a silently shorter page."""
    db = world.log.db
    events = active_tables(db, "events")["events"]
    first = world.ok("/v1/events", {"limit": 1})["data"][0]
    with db.transaction() as cursor:
        cursor.execute(
            db.sql(f"UPDATE {events} SET svix_id = %s WHERE position = %s"),
            ["msg_misplaced", first["position"]],
        )
        cursor.execute(
            db.sql(
                f"INSERT INTO {events} (position, svix_id, type, received_at, actor)"
                " VALUES (%s, %s, %s, %s, %s)"
            ),
            [10**12, "msg_nowhere", "user.created", 0, "{}"],
        )
    for path in ("/v1/events/msg_misplaced", "/v1/events/msg_nowhere", "/v1/events"):
        response = world.get(path)
        assert response.status_code == 500, (path, response.text)
        assert response.json()["error"]["code"] == "internal_error"


def test_events_list_and_one_event(world: World) -> None:
    events = world.walk("/v1/events", limit=5)
    assert len(events) == len(payload_files()) + len(fresh_deliveries())
    positions = [e["position"] for e in events]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert {e["type"] for e in events} >= {p.stem for p in payload_files()}
    sample = next(
        e for e in events if e["type"] == "user.created" and e["subject"]["id"] == SAMPLE_USER
    )
    assert sample["subject"] == {"id": SAMPLE_USER, "object": "user"}
    assert sample["occurred_at"] == "2024-05-28T08:00:00.018Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", sample["received_at"])
    assert sample["instance_id"] == "ins_3U1LqE69xkjuE3ycBqwbfwdjTZ1"
    assert sample["actor"]["ip"] == "192.168.1.100"
    assert sample["data"]["first_name"] == "John"
    one = world.ok(f"/v1/events/{sample['id']}")
    assert one == sample
    assert set(one) == {
        "id",
        "position",
        "type",
        "subject",
        "occurred_at",
        "received_at",
        "instance_id",
        "actor",
        "data",
    }


def test_event_filters(world: World) -> None:
    everything = world.walk("/v1/events", limit=500)
    by_type = world.walk("/v1/events", {"type": "user.updated"})
    assert {e["type"] for e in by_type} == {"user.updated"} and len(by_type) == 2
    several = world.walk("/v1/events", [("type", "user.created"), ("type", "session.ended")])
    assert sorted({e["type"] for e in several}) == ["session.ended", "user.created"]
    assert [e["position"] for e in several] == sorted(e["position"] for e in several)
    prefix = world.walk("/v1/events", {"type": "user.*"}, limit=2)
    assert {e["type"] for e in prefix} == {"user.created", "user.updated", "user.deleted"}
    assert len(prefix) == sum(1 for e in everything if e["type"].startswith("user."))
    mixed = world.walk("/v1/events", [("type", "session.*"), ("type", "email.created")])
    assert {e["type"] for e in mixed} == {
        t
        for t in (e["type"] for e in everything)
        if t.startswith("session.") or t == "email.created"
    }
    assert world.walk("/v1/events", {"type": "nothing.*"}) == []
    assert world.walk("/v1/events", {"type": "no.such_type"}) == []

    # subject: any Clerk id the event concerns (the membership's user, the session's user...)
    fresh = world.walk("/v1/events", {"subject": FRESH_USER}, limit=2)
    assert sorted(e["type"] for e in fresh) == sorted(
        ["user.created", "user.updated", "session.created", "organizationMembership.created"]
    )
    org = world.walk("/v1/events", {"subject": SAMPLE_ORG, "type": "organizationDomain.*"})
    assert org and all(e["type"].startswith("organizationDomain.") for e in org)
    session = world.walk("/v1/events", {"subject": SAMPLE_SESSION})
    assert session and all(e["type"].startswith("session.") for e in session)
    # Billing events concern whom they bill, and the subscription an item belongs to.
    billing = ("subscription.*", "subscriptionItem.*", "paymentAttempt.*")
    billed = world.walk("/v1/events", [("type", t) for t in billing])
    assert len(billed) == 16
    paid_by_user = world.walk(
        "/v1/events", [("subject", SAMPLE_USER), *(("type", t) for t in billing)]
    )
    # Each names the user as its payer, but the sample subscriptionItem.created (no payer).
    assert [e["id"] for e in paid_by_user] == [
        e["id"] for e in billed if e["type"] != "subscriptionItem.created"
    ]
    items = world.walk("/v1/events", {"subject": SUBSCRIPTION, "type": "subscriptionItem.*"})
    assert len(items) == 10
    # ... and the payment and the subscription items they name (found by QA).
    payment = "cpa_3nkaIOtMu6ZTceoQT233zdrjeJo"  # of the sample payment attempts
    paid = {e["type"] for e in world.walk("/v1/events", {"subject": payment})}
    assert {"paymentAttempt.created", "subscription.created"} <= paid
    item = "csub_item_3Jl5LNP9kC6EEBHwaamShyvBEYb"
    naming_item = {e["type"] for e in world.walk("/v1/events", {"subject": item})}
    assert {"paymentAttempt.created", "subscription.created", "subscriptionItem.active"} <= (
        naming_item
    )

    # since inclusive, until exclusive, ISO or epoch ms
    at_update = world.walk("/v1/events", {"since": str(T_UPDATED), "until": T_UPDATED + 1})
    assert [e["type"] for e in at_update] == ["user.updated"]
    iso = world.walk(
        "/v1/events", {"since": format_time(T_UPDATED), "until": format_time(T_UPDATED + 1)}
    )
    assert iso == at_update
    # An offset typed in the URL as it is written: its `+` arrives as a space.
    typed = "/v1/events?since=2024-05-28T14:50:00+02:00&until=2024-05-28T14:50:00.001+02:00"
    assert world.ok(typed)["data"] == at_update
    before = world.walk("/v1/events", {"until": str(T_UPDATED)})
    after = world.walk("/v1/events", {"since": str(T_UPDATED)})
    assert len(before) + len(after) == len(everything)
    combined = world.walk(
        "/v1/events", {"subject": FRESH_USER, "type": "user.*", "since": T_UPDATED}
    )
    assert [e["data"]["first_name"] for e in combined] == ["Grace"]


@pytest.mark.parametrize("svix_id", ["msg_a/b", "msg_/", "a/b/history"])
def test_an_event_is_found_by_any_svix_id_its_sender_chose(world: World, svix_id: str) -> None:
    """A svix-id with `/` was recorded, then never found: 404 (found by review)."""
    response = post(world.client, world.secret, payload("role.created"), svix_id=svix_id)
    assert response.status_code == 200, response.text
    world.projector.run_once()
    found = world.ok(f"/v1/events/{quote(svix_id, safe='')}")
    assert found["id"] == svix_id
    assert found["type"] == "role.created"


def test_changes_to_roles_and_permissions_are_listed(world: World) -> None:
    """`role.*` and `permission.*` carry the whole object, as `user.updated` does: what a role
    may do, who changed it and from where, is an audit's question (found by review: `/v1/changes`
    listed nothing of them). The samples: a role created with one permission, that permission
    edited and another added, then the role deleted; a permission renamed, then deleted."""
    role_id = payload("role.created")["data"]["id"]
    changes = world.walk("/v1/changes", {"subject": role_id})
    by_type: dict[str, dict[str, list[Any]]] = {}
    for change in changes:
        assert change["subject"] == {"id": role_id, "object": "role"}
        assert change["actor"]["ip"] == "192.168.1.100"
        by_type.setdefault(change["type"], {})[change["field"]] = [change["from"], change["to"]]
    assert set(by_type) == {"role.created", "role.updated", "role.deleted"}
    assert by_type["role.created"]["key"] == [None, "org:content_manager"]
    updated = by_type["role.updated"]
    assert updated["name"] == ["Content Manager", "Editor"]
    create_posts = "permissions.perm_3x6fJavCGjK2K3pPKmNZNtl8kq0"  # its key edited in place
    assert updated[f"{create_posts}.key"] == ["org:posts:create", "org:posts:edit"]
    publish_posts = updated["permissions.perm_3qUdfRBPNcpDX6vSyEmOLR7zge3"]  # added whole
    assert publish_posts[0] is None and publish_posts[1]["key"] == "org:posts:publish"
    assert by_type["role.deleted"] == {"deleted": [None, True]}
    by_field = world.walk("/v1/changes", {"type": "permission.*", "field": "name"})
    assert [(c["type"], c["from"], c["to"]) for c in by_field] == [
        ("permission.created", None, "Create Posts"),
        ("permission.updated", "Create Posts", "Create and Edit Posts"),
    ]


def test_a_domain_deletion_stub_is_found_by_its_organization(world: World) -> None:
    """Clerk's `organizationDomain.deleted` names only the domain; its organization is the one
    the domain's earlier events named (SPEC 4: `subject` is any id the event concerns), in a
    rebuild as when following; a stub that came before any event naming its organization
    waits for one."""
    domain_id = payload("organizationDomain.deleted")["data"]["id"]
    orphan = {"object": "organization_domain", "id": "orgdmn_orphanStubFirst", "deleted": True}
    world.deliver(_envelope("organizationDomain.deleted", orphan, T_UPDATED, UPDATE_IP))
    domain = dict(payload("organizationDomain.created")["data"], id="orgdmn_orphanStubFirst")
    world.deliver(_envelope("organizationDomain.created", domain, T_UPDATED, UPDATE_IP))
    world.projector.run_once()

    def stubs_of_the_organization() -> list[str]:
        return [
            e["subject"]["id"]
            for e in world.walk("/v1/events", {"subject": SAMPLE_ORG})
            if e["type"] == "organizationDomain.deleted"
        ]

    assert stubs_of_the_organization() == [domain_id, "orgdmn_orphanStubFirst"]
    world.projector.rebuild("events")
    world.projector.run_once()
    assert all(p["state"] == "live" for p in world.ok("/v1/projections")["data"])
    assert stubs_of_the_organization() == [domain_id, "orgdmn_orphanStubFirst"]


def test_a_nested_object_set_after_creation_is_found_by_its_leaf_field(world: World) -> None:
    """The sample domain is created with `verification: null` and verified by its update: the
    change is listed leaf by leaf, as a creation lists it, so `field=` finds it."""
    domain_id = payload("organizationDomain.updated")["data"]["id"]
    changes = world.walk("/v1/changes", {"subject": domain_id, "field": "verification.status"})
    assert [(c["type"], c["from"], c["to"]) for c in changes] == [
        ("organizationDomain.updated", None, "verified")
    ]


def test_an_element_added_or_removed_whole_is_found_by_its_leaf_field(world: World) -> None:
    """An address added or removed is one change at `email_addresses.<id>`; `field=` of its
    `email_address` found only its creation, never its removal (found by review)."""
    user_id = "user_2elementsAuditReadApi01"

    def address(element_id: str) -> dict[str, Any]:
        return {"id": element_id, "object": "email_address", "email_address": f"{element_id}@x"}

    for step, ids in enumerate((["idn_a"], ["idn_a", "idn_b"], ["idn_b"])):
        user = dict(payload("user.updated")["data"], id=user_id, updated_at=T_CREATED + step)
        user["email_addresses"] = [address(element_id) for element_id in ids]
        world.deliver(_envelope("user.updated", user, T_CREATED + step, "198.51.100.1"))
    world.projector.run_once()

    def found(field: str) -> list[tuple[str, Any, Any]]:
        changes = world.walk("/v1/changes", {"subject": user_id, "field": field}, limit=1)
        return [(c["field"], c["from"], c["to"]) for c in changes]

    assert found("email_addresses.idn_a.email_address") == [
        ("email_addresses.idn_a.email_address", None, "idn_a@x"),
        ("email_addresses.idn_a", address("idn_a"), None),
    ]
    assert found("email_addresses.idn_b.email_address") == [
        ("email_addresses.idn_b", None, address("idn_b"))
    ]


def _under_or_at(field: str, name: str) -> bool:
    """What `field=name` selects: the path, the paths enclosing it and the paths under it."""
    return field == name or field.startswith(f"{name}.") or field in with_enclosing(name)


def test_a_field_finds_the_changes_at_the_paths_under_it(world: World) -> None:
    """`field=public_metadata` lists the changes of its keys, `field=email_addresses` those of
    its elements: the roles and entitlements an audit looks for are keys of metadata. Neighbours
    by text (`public_metadata2`, `public_metadata-x`) and an escaped key's sibling are not under
    it. Beyond MAX_BRANCHES paths under one name (addresses here), they are read as one range."""
    user_id = "user_2pathsUnderAuditReadApi01"
    steps = [
        {"department": "a", "roles": {"admin": True}},
        {"department": "b", "roles": {"admin": True}},
        {"department": "b", "roles": {"admin": False, "billing": True}},
        {"department": "b"},
    ]
    addresses = queries.MAX_BRANCHES + 3
    for step, metadata in enumerate(steps):
        user = dict(payload("user.updated")["data"], id=user_id, updated_at=T_CREATED + step)
        user.update(
            public_metadata=metadata,
            public_metadata2=step,
            unsafe_metadata={"a.b": {"c": step}, "a": {"b": step % 2}},
            email_addresses=[
                {"id": f"idn_{n:02}", "object": "email_address", "email_address": f"{n}.{step}@x"}
                for n in range(addresses if step < 2 else 2)
            ],
        )
        user["public_metadata-x"] = step
        world.deliver(_envelope("user.updated", user, T_CREATED + step, "198.51.100.1"))
    world.projector.run_once()
    everything = world.walk("/v1/changes", limit=500)
    names = [
        ["public_metadata"],
        ["public_metadata.roles"],
        ["public_metadata", "public_metadata.roles.admin"],
        ["unsafe_metadata.a\\.b"],
        ["unsafe_metadata.a"],
        ["email_addresses"],
        ["email_addresses", "email_addresses.idn_01.email_address", "public_metadata"],
    ]
    for fields in names:
        expected = [c for c in everything if any(_under_or_at(c["field"], n) for n in fields)]
        users = [c for c in expected if c["subject"]["id"] == user_id]
        assert users, fields
        pairs = [("field", name) for name in fields]
        for limit in (1, 3, 50):
            assert world.walk("/v1/changes", pairs, limit=limit) == expected, (fields, limit)
            found = world.walk("/v1/changes", [*pairs, ("subject", user_id)], limit=limit)
            assert found == users, (fields, limit)

    def fields_found(name: str) -> set[str]:
        return {c["field"] for c in world.walk("/v1/changes", {"field": name, "subject": user_id})}

    assert fields_found("public_metadata") == {
        "public_metadata.department",
        "public_metadata.roles.admin",
        "public_metadata.roles.billing",
    }
    assert fields_found("unsafe_metadata.a") == {"unsafe_metadata.a.b"}
    # Not a path (an escape with nothing to escape): nothing under it, not `a\.b`'s changes.
    assert fields_found("unsafe_metadata.a\\") == set()
    removed = world.walk("/v1/changes", {"field": "email_addresses", "subject": user_id})
    assert len({c["field"] for c in removed if c["to"] is None}) == addresses - 2
    db = world.log.db
    if db.dialect == "postgresql":  # whatever the database's own collation (this one's is C)
        changes = active_tables(db, "objects")["changes"]
        row = db.fetchone(f"SELECT pg_collation_for(field) AS c FROM {changes} LIMIT 1")
        assert row["c"] == '"C"'


def test_a_field_walk_finds_paths_that_appear_under_it_while_it_runs(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paths under a name are looked up once and kept (a hint); a page is one statement
    that also reads the gaps between them. Paths that appear after the look-up, even between
    it and the page's statement (found by review: with the look-up and the page in two
    snapshots, the page's cursor passed them), are found, each once, in key order."""
    user_id = "user_2pathsAppearAuditReadApi1"
    step = [0]

    def update(**metadata: Any) -> None:
        step[0] += 1
        at = T_CREATED + step[0]
        user = dict(payload("user.updated")["data"], id=user_id, updated_at=at)
        user["public_metadata"] = {"m": step[0], **metadata}
        world.deliver(_envelope("user.updated", user, at, "198.51.100.1"))

    for _ in range(3):
        update()
    world.projector.run_once()
    assert world.walk("/v1/changes", {"field": "public_metadata", "subject": user_id})
    look_under = queries._FieldFilter._look_under
    arrivals = [{"a": 1}, {"z": 1}, {"z": 2}, {"n": 1, "z": 3}]

    def look_then_record(self: Any, prefixes: list[str]) -> Any:
        found = look_under(self, prefixes)
        if arrivals:  # between the look-up and the page's statement
            update(**arrivals.pop(0))
            world.projector.run_once()
        return found

    monkeypatch.setattr(queries._FieldFilter, "_look_under", look_then_record)
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        query = [("field", "public_metadata"), ("limit", 2)]
        page = world.ok("/v1/changes", [*query, *([("cursor", cursor)] if cursor else [])])
        seen += page["data"]
        # Forgotten after each page, so each looks up again while deliveries arrive.
        queries._paths_under_known.clear()
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert not arrivals
    everything = world.walk("/v1/changes", limit=500)
    expected = [c for c in everything if _under_or_at(c["field"], "public_metadata")]
    assert seen == expected
    assert {"public_metadata.a", "public_metadata.n", "public_metadata.z"} <= {
        c["field"] for c in seen
    }
    # A path that appears under a name whose paths are known is found in a gap between them.
    monkeypatch.setattr(queries._FieldFilter, "_look_under", look_under)
    world.walk("/v1/changes", {"field": "public_metadata"})
    update(b=1, y=1)
    world.projector.run_once()
    everything = world.walk("/v1/changes", limit=500)
    expected = [c for c in everything if _under_or_at(c["field"], "public_metadata")]
    for limit in (1, 3):
        assert world.walk("/v1/changes", {"field": "public_metadata"}, limit=limit) == expected


def test_users_state_and_as_of(world: World) -> None:
    deleted = world.ok(f"/v1/users/{SAMPLE_USER}")
    assert deleted["id"] == SAMPLE_USER and deleted["deleted"] is True and deleted["as_of"] is None
    fresh = world.ok(f"/v1/users/{FRESH_USER}")
    assert fresh["deleted"] is False and fresh["data"]["first_name"] == "Grace"
    assert fresh["updated_at"] == format_time(T_UPDATED)

    between = world.ok(f"/v1/users/{FRESH_USER}", {"as_of": T_CREATED + 1000})
    assert between["data"]["first_name"] == "Ada" and between["as_of"] == format_time(
        T_CREATED + 1000
    )
    # the samples: user.created at ...200018, user.updated at ...500018, user.deleted later
    sample_between = world.ok(f"/v1/users/{SAMPLE_USER}", {"as_of": "2024-05-28T08:01:40Z"})
    assert sample_between["deleted"] is False
    assert (
        sample_between["data"]["last_name"] == "Doe" and sample_between["data"]["username"] is None
    )
    sample_later = world.ok(f"/v1/users/{SAMPLE_USER}", {"as_of": 1716883500018})
    assert sample_later["data"]["last_name"] == "Doe Updated"
    assert world.get(f"/v1/users/{FRESH_USER}", {"as_of": T_CREATED - 1}).status_code == 404

    org = world.ok(f"/v1/organizations/{SAMPLE_ORG}")
    assert org["deleted"] is True
    org_then = world.ok(f"/v1/organizations/{SAMPLE_ORG}", {"as_of": "2024-05-28T08:00:00.018Z"})
    assert org_then["deleted"] is False and org_then["data"]["name"] == "Acme Corp"

    missing = world.get("/v1/users/user_nobody")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert "user_nobody" in missing.json()["error"]["message"]
    assert world.get("/v1/users/user_nobody", {"as_of": 5}).status_code == 404
    assert world.get("/v1/organizations/org_nobody").status_code == 404
    assert world.get("/v1/events/msg_nobody").json()["error"]["code"] == "not_found"


def test_histories(world: World) -> None:
    history = world.walk(f"/v1/users/{FRESH_USER}/history", limit=1)
    assert [h["type"] for h in history] == ["user.created", "user.updated"]
    created, updated = history
    assert created["position"] < updated["position"]
    assert created["object"] == {"id": FRESH_USER, "type": "user"}
    assert {"field": "first_name", "from": None, "to": "Ada"} in created["changes"]
    assert updated["changes"] == [{"field": "first_name", "from": "Ada", "to": "Grace"}]
    assert updated["actor"]["ip"] == UPDATE_IP and updated["stale"] is False
    assert updated["occurred_at"] == format_time(T_UPDATED)
    assert set(updated) == {
        "position",
        "event_id",
        "type",
        "occurred_at",
        "actor",
        "stale",
        "changes",
        "object",
    }
    assert world.walk(f"/v1/users/{FRESH_USER}/history", {"since": T_UPDATED}) == [updated]

    org_history = world.walk(f"/v1/organizations/{SAMPLE_ORG}/history", limit=3)
    kinds = {h["object"]["type"] for h in org_history}
    assert kinds >= {
        "organization",
        "organization_membership",
        "organization_invitation",
        "organization_domain",
    }
    positions = [h["position"] for h in org_history]
    assert positions == sorted(positions)
    assert world.get("/v1/users/user_nobody/history").status_code == 404
    assert world.get("/v1/organizations/org_nobody/history").status_code == 404


def test_a_type_clerk_may_add_to_a_known_family_is_stored_and_folds_into_nothing(
    world: World,
) -> None:
    """SPEC 2: unknown types are stored and searchable and affect no aggregate. Taken by their
    prefix, a `session.*` type about another kind of object made a session of it (listed, with
    a timeline), a `user.*` one a user, and an `email.*` one counted an e-mail (found by QA)."""
    reads = [
        f"/v1/users/{FRESH_USER}",
        f"/v1/users/{FRESH_USER}/sessions",
        f"/v1/users/{FRESH_USER}/organizations",
        f"/v1/users/{FRESH_USER}/history",
        f"/v1/sessions/{FRESH_SESSION}/timeline",
        "/v1/changes",
    ]
    far = {"as_of": T_UPDATED + 10**9}
    before = [
        world.walk(path, limit=500) if path == "/v1/changes" else world.ok(path) for path in reads
    ]
    state_before = world.ok(f"/v1/users/{FRESH_USER}", far)
    sessions_before = world.ok(f"/v1/users/{FRESH_USER}/sessions", far)
    token = {"object": "session_token", "id": "stkn_2unknownType", "session_id": FRESH_SESSION}
    attempt = {"object": "sign_in_attempt", "id": "sia_2unknownType", "status": "failed"}
    membership = dict(payload("organizationMembership.created")["data"], id=FRESH_MEMBERSHIP)
    membership.update(role="org:member", updated_at=T_UPDATED + 5)
    email = dict(payload("email.created")["data"], user_id=FRESH_USER)
    unknown = [
        ("session.tokenCreated", dict(token, user_id=FRESH_USER, updated_at=T_UPDATED)),
        ("user.signInAttempted", dict(attempt, user_id=FRESH_USER, updated_at=T_UPDATED)),
        ("organizationMembership.roleSynced", membership),
        ("email.delivered", email),
    ]
    for event_type, data in unknown:
        body = _envelope("organizationMembership.created", data, T_UPDATED + 5, UPDATE_IP)
        world.deliver(dict(body, type=event_type))
    world.projector.run_once()
    after = [
        world.walk(path, limit=500) if path == "/v1/changes" else world.ok(path) for path in reads
    ]
    assert after == before
    assert world.ok(f"/v1/users/{FRESH_USER}", far) == state_before
    assert world.ok(f"/v1/users/{FRESH_USER}/sessions", far) == sessions_before
    assert world.get("/v1/users/sia_2unknownType").status_code == 404
    # An id an event mentions: its sub-collections are empty, not a 404.
    assert world.ok("/v1/sessions/stkn_2unknownType/timeline")["data"] == []
    for event_type, data in unknown:  # stored and searchable
        found = world.ok("/v1/events", {"type": event_type})["data"]
        assert [e["subject"]["id"] for e in found] == [data["id"]]
    assert len(world.ok("/v1/events", {"subject": "stkn_2unknownType"})["data"]) == 1


def test_ids_of_every_other_kind_are_404_under_user_organization_and_session_routes(
    world: World,
) -> None:
    """Objects the store knows, of other kinds: `/v1/users/role_.../history` answered the
    role's own history as a user's, and `/v1/users/ema_.../sessions` an empty list (review).
    SPEC 4: an unknown id is a 404. Every Clerk id of a kind starts with its prefix."""
    ids = {
        "role": payload("role.created")["data"]["id"],
        "permission": payload("permission.created")["data"]["id"],
        "membership": payload("organizationMembership.created")["data"]["id"],
        "e-mail": payload("email.created")["data"]["id"],
    }
    assert world.walk("/v1/changes", {"subject": ids["role"]})  # known, with a history
    for path, said in (
        (f"/v1/users/{ids['role']}/history", f"No user '{ids['role']}': that is the id of a role."),
        (
            f"/v1/organizations/{ids['permission']}/history",
            f"No organization '{ids['permission']}': that is the id of a permission.",
        ),
        (
            f"/v1/users/{ids['membership']}",
            f"No user '{ids['membership']}': that is the id of an organization membership.",
        ),
        (
            f"/v1/users/{ids['e-mail']}/sessions",
            f"No user '{ids['e-mail']}': that is the id of an e-mail.",
        ),
    ):
        response = world.get(path)
        assert (response.status_code, response.json()["error"]["message"]) == (404, said), path


def test_sessions_memberships_invitations_domains_timeline(world: World) -> None:
    sessions = world.walk(f"/v1/users/{FRESH_USER}/sessions")
    assert _ids(sessions) == [FRESH_SESSION]
    assert sessions[0]["status"] == "active" and sessions[0]["ended_at"] is None
    assert sessions[0]["created_at"] == format_time(T_CREATED)
    assert set(sessions[0]["latest_activity"]) == {
        "device_type",
        "browser_name",
        "browser_version",
        "ip_address",
        "city",
        "country",
    }
    ended = world.walk(f"/v1/users/{SAMPLE_USER}/sessions")
    assert _ids(ended) == [SAMPLE_SESSION] and ended[0]["ended_at"] is not None
    # Its ended, pending, removed and revoked versions report no activity; created's is the last.
    reported = payload("session.created")["data"]["latest_activity"]
    assert ended[0]["latest_activity"] == {
        key: reported[key] for key in sessions[0]["latest_activity"]
    }

    # The sample organization is deleted: no current membership, invitation or domain (see
    # test_memberships_domains_invitations_are_current_while_their_organization_is).
    assert world.ok(f"/v1/organizations/{SAMPLE_ORG}")["deleted"] is True
    assert world.walk(f"/v1/users/{FRESH_USER}/organizations") == []
    assert world.walk(f"/v1/organizations/{SAMPLE_ORG}/members", limit=1) == []
    assert world.walk(f"/v1/organizations/{SAMPLE_ORG}/invitations") == []
    assert world.walk(f"/v1/organizations/{SAMPLE_ORG}/domains") == []

    timeline = world.walk(f"/v1/sessions/{SAMPLE_SESSION}/timeline", limit=2)
    assert len(timeline) == sum(1 for p in payload_files() if p.stem.startswith("session."))
    keys = [(t["occurred_at"], t["position"]) for t in timeline]
    assert keys == sorted(keys)
    assert {t["type"] for t in timeline} == {
        p.stem for p in payload_files() if p.stem.startswith("session.")
    }
    assert all(set(t) >= {"type", "status", "occurred_at", "actor"} for t in timeline)

    for path in (
        "/v1/users/user_nobody/sessions",
        "/v1/users/user_nobody/organizations",
        "/v1/sessions/sess_nobody/timeline",
        "/v1/organizations/org_nobody/members",
        "/v1/organizations/org_nobody/invitations",
        "/v1/organizations/org_nobody/domains",
    ):
        response = world.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_a_timeline_walk_sees_each_event_once_that_arrives_during_it(world: World) -> None:
    """A session's events at 10 s steps, walked two a page. Between pages one older than the
    cursor arrives late (a Svix retry): by time it sorted behind the cursor and the walk never
    saw it (SPEC 4: every item once, even while new events arrive). The walk takes the events
    stored before it began in time order, then those stored since in store order."""
    path = f"/v1/sessions/{FRESH_SESSION}/timeline"

    def session_event(event_type: str, second: int) -> dict[str, Any]:
        session = copy.deepcopy(payload(event_type)["data"])
        at = T_CREATED + second * 1000
        session.update(id=FRESH_SESSION, user_id=FRESH_USER, updated_at=at)
        return _envelope(event_type, session, at, UPDATE_IP)

    for second in (20, 40, 60):
        world.deliver(session_event("session.pending", second))
    world.projector.run_once()
    walked: list[tuple[str, int]] = []

    def page(cursor: str | None) -> str | None:
        answer = world.ok(path, {"limit": 2, **({"cursor": cursor} if cursor else {})})
        walked.extend((t["occurred_at"], t["position"]) for t in answer["data"])
        return answer["next_cursor"]

    cursor = page(None)  # created (0 s), 20 s
    for event_type, second in (("session.revoked", 10), ("session.removed", 50)):
        world.deliver(session_event(event_type, second))  # behind the cursor, and ahead of it
    world.deliver(session_event("session.pending", 5))
    world.projector.run_once()
    cursor = page(cursor)  # 40, 60 s
    cursor = page(cursor)  # what arrived: 10, 50 s
    world.deliver(session_event("session.ended", 30))  # arrives on the walk's last stretch
    world.projector.run_once()
    while cursor:
        cursor = page(cursor)  # 5, 30 s
    at = [format_time(T_CREATED + second * 1000) for second in (0, 20, 40, 60, 10, 50, 5, 30)]
    assert [occurred for occurred, _ in walked] == at
    positions = [position for _, position in walked]
    assert len(set(positions)) == len(positions)
    assert positions[4:] == sorted(positions[4:])  # those that arrived, in store order
    # A walk begun now has them all, in time order.
    assert [t["occurred_at"] for t in world.walk(path, limit=2)] == sorted(at)
    # A time filter holds on both stretches of a walk.
    walked.clear()
    window = {"since": T_CREATED + 15_000, "until": T_CREATED + 55_000}
    answer = world.ok(path, {**window, "limit": 1})
    walked.extend((t["occurred_at"], t["position"]) for t in answer["data"])
    world.deliver(session_event("session.pending", 35))  # in the window
    world.deliver(session_event("session.pending", 3))  # before it
    world.projector.run_once()
    cursor = answer["next_cursor"]
    while cursor:
        answer = world.ok(path, {**window, "limit": 1, "cursor": cursor})
        walked.extend((t["occurred_at"], t["position"]) for t in answer["data"])
        cursor = answer["next_cursor"]
    expected = [T_CREATED + second * 1000 for second in (20, 30, 40, 50, 35)]
    assert [occurred for occurred, _ in walked] == [format_time(e) for e in expected]


def test_a_session_event_without_a_timestamp_has_no_occurred_at_on_the_timeline(
    world: World,
) -> None:
    """Null there as on `/v1/events` (timelines v1 showed its receipt time, which a reader takes
    for when it happened). It is placed by its receipt time, and a time filter, which applies to
    `occurred_at` (SPEC 4), selects it on neither."""
    session = copy.deepcopy(payload("session.ended")["data"])
    session.update(id=FRESH_SESSION, user_id=FRESH_USER, updated_at=T_UPDATED)
    body = _envelope("session.ended", session, T_UPDATED, UPDATE_IP)
    del body["timestamp"]
    world.deliver(body)
    world.projector.run_once()
    path = f"/v1/sessions/{FRESH_SESSION}/timeline"
    timeline = [(t["type"], t["occurred_at"]) for t in world.walk(path, limit=1)]
    assert timeline == [("session.created", format_time(T_CREATED)), ("session.ended", None)]
    events = world.walk("/v1/events", {"subject": FRESH_SESSION})
    assert [(e["type"], e["occurred_at"]) for e in events] == timeline
    for filters in ({"since": T_CREATED}, {"until": "2999-01-01T00:00:00Z"}):
        assert [t["type"] for t in world.walk(path, filters)] == ["session.created"]
        assert [
            e["type"] for e in world.walk("/v1/events", {**filters, "subject": FRESH_SESSION})
        ] == ["session.created"]


def test_memberships_domains_invitations_are_current_while_their_organization_is(
    world: World,
) -> None:
    """A membership of a deleted organization or of a deleted user is not current, whether or
    not Clerk sends its own deletion (found by a review: listed with its role for ever)."""
    org_id = "org_2liveAuditReadApiTest01"
    organization = dict(payload("organization.created")["data"], id=org_id, created_at=T_CREATED)
    deliveries = [_envelope("organization.created", organization, T_CREATED, "198.51.100.1")]
    for membership_id, user_id in (("orgmem_2live1", FRESH_USER), ("orgmem_2live2", SAMPLE_USER)):
        membership = copy.deepcopy(payload("organizationMembership.created")["data"])
        membership.update(id=membership_id, role="org:admin", created_at=T_CREATED)
        membership["organization"]["id"] = org_id
        membership["public_user_data"]["user_id"] = user_id
        deliveries.append(
            _envelope("organizationMembership.created", membership, T_CREATED, "198.51.100.1")
        )
    domain = copy.deepcopy(payload("organizationDomain.created")["data"])
    domain.update(id="orgdmn_2live", organization_id=org_id, name="live.example")
    deliveries.append(_envelope("organizationDomain.created", domain, T_CREATED, "198.51.100.1"))
    invitation = dict(payload("organizationInvitation.created")["data"], id="orginv_2live")
    invitation.update(organization_id=org_id, status="pending")
    deliveries.append(
        _envelope("organizationInvitation.created", invitation, T_CREATED, "198.51.100.1")
    )
    for body in deliveries:
        world.deliver(body)
    world.projector.run_once()
    [membership] = world.walk(f"/v1/users/{FRESH_USER}/organizations")
    assert (membership["id"], membership["role"], membership["organization_id"]) == (
        "orgmem_2live1",
        "org:admin",
        org_id,
    )
    # The sample user is deleted: its membership is not among the members.
    assert _ids(world.walk(f"/v1/organizations/{org_id}/members")) == ["orgmem_2live1"]
    assert _ids(world.walk(f"/v1/organizations/{org_id}/domains")) == ["orgdmn_2live"]
    invitations = world.walk(f"/v1/organizations/{org_id}/invitations")
    assert [(i["id"], i["status"]) for i in invitations] == [("orginv_2live", "pending")]

    deleted = {"object": "organization", "id": org_id, "deleted": True}
    world.deliver(_envelope("organization.deleted", deleted, T_UPDATED, "198.51.100.1"))
    world.projector.run_once()
    assert world.walk(f"/v1/users/{FRESH_USER}/organizations") == []
    assert world.walk(f"/v1/organizations/{org_id}/members") == []
    assert world.walk(f"/v1/organizations/{org_id}/domains") == []
    assert world.walk(f"/v1/organizations/{org_id}/invitations") == []  # not "pending" for ever
    # Who was a member stays in the organization's history.
    history = world.walk(f"/v1/organizations/{org_id}/history")
    assert "orgmem_2live1" in {entry["object"]["id"] for entry in history}


def test_changes_and_filters(world: World) -> None:
    everything = world.walk("/v1/changes", limit=50)
    keys = [(c["position"], c["subject"]["id"], c["field"]) for c in everything]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    rename = [
        c for c in everything if c["type"] == "user.updated" and c["subject"]["id"] == FRESH_USER
    ]
    assert rename == [
        {
            "position": rename[0]["position"],
            "event_id": rename[0]["event_id"],
            "type": "user.updated",
            "occurred_at": format_time(T_UPDATED),
            "subject": {"id": FRESH_USER, "object": "user"},
            "owner_id": FRESH_USER,
            "field": "first_name",
            "from": "Ada",
            "to": "Grace",
            "actor": {
                "ip": UPDATE_IP,
                "user_agent": "pytest",
                "user_id": None,
                "impersonator": None,
            },
            "stale": False,
        }
    ]
    by_field = world.walk("/v1/changes", {"field": "first_name"}, limit=1)
    assert {c["field"] for c in by_field} == {"first_name"}
    assert ("Ada", "Grace") in {(c["from"], c["to"]) for c in by_field}
    fields = world.walk("/v1/changes", [("field", "first_name"), ("field", "role")])
    assert {c["field"] for c in fields} == {"first_name", "role"}
    by_ip = world.walk("/v1/changes", {"actor_ip": UPDATE_IP})
    assert by_ip == rename
    by_subject = world.walk("/v1/changes", {"subject": FRESH_USER, "field": "first_name"})
    assert [(c["from"], c["to"]) for c in by_subject] == [(None, "Ada"), ("Ada", "Grace")]
    # A membership is its organization's, and concerns its user too: their role changes.
    member = world.walk("/v1/changes", {"subject": FRESH_USER, "type": "organizationMembership.*"})
    assert member and {c["subject"]["id"] for c in member} == {FRESH_MEMBERSHIP}
    assert ["role", None, "org:admin"] in [[c["field"], c["from"], c["to"]] for c in member]
    owned = world.walk("/v1/changes", {"subject": SAMPLE_ORG}, limit=9)
    assert {c["subject"]["object"] for c in owned} >= {"organization", "organization_invitation"}
    assert all(c["owner_id"] == SAMPLE_ORG or c["subject"]["id"] == SAMPLE_ORG for c in owned)
    by_type = world.walk("/v1/changes", {"type": "organizationInvitation.*"})
    assert by_type and {c["type"] for c in by_type} <= {
        "organizationInvitation.created",
        "organizationInvitation.accepted",
        "organizationInvitation.revoked",
    }
    timed = world.walk("/v1/changes", {"since": format_time(T_UPDATED), "until": T_UPDATED + 1})
    assert timed == rename
    assert world.walk("/v1/changes", {"field": "first_name", "actor_ip": "10.9.9.9"}) == []
    # As many fields as allowed, deep ones: their enclosing paths are a thousand and more,
    # which as ORs SQLite refused (a 503 that asked the client to retry: review).
    deep = [("field", f"unsafe_metadata.f{n}.{'.'.join('k' * 10)}") for n in range(99)]
    with_deep = world.walk("/v1/changes", [*deep, ("field", "first_name"), ("subject", FRESH_USER)])
    assert with_deep == by_subject
    # A path longer than any recorded one is none of them; its enclosing ones may be.
    assert world.walk("/v1/changes", {"field": "k" * 300}) == []
    too_long = "first_name." + ".".join(["k"] * 150)
    assert world.walk("/v1/changes", {"field": too_long, "subject": FRESH_USER}) == by_subject
    # One address, in any of its notations; anything else is refused, not an empty answer.
    user = dict(payload("user.updated")["data"], id="user_ipv6Actor", last_name="Six")
    world.deliver(_envelope("user.updated", user, T_UPDATED, "2001:db8::7"))
    world.projector.run_once()
    for ip, user_id in (
        ("2001:DB8::9", "user_ipv6Upper"),
        ("::ffff:198.51.100.4", "user_ipv4Mapped"),
        ("203.0.113.9, 10.0.0.1", "user_forwardedList"),  # as Clerk may write it
        ("fe80::1", "user_linkLocal"),
    ):
        world.deliver(_envelope("user.updated", dict(user, id=user_id), T_UPDATED, ip))
    world.projector.run_once()
    for typed, user_id in (
        ("2001:db8::7", "user_ipv6Actor"),
        ("2001:DB8:0:0:0:0:0:7", "user_ipv6Actor"),
        (" 2001:db8::7 ", "user_ipv6Actor"),
        ("2001:db8::9", "user_ipv6Upper"),
        ("198.51.100.4", "user_ipv4Mapped"),
        ("::FFFF:198.51.100.4", "user_ipv4Mapped"),
        ("203.0.113.9, 10.0.0.1", "user_forwardedList"),  # copied from `actor.ip`
        # A zone names the sender's interface, not part of the address (was a 500: QA).
        ("fe80::1%eth0", "user_linkLocal"),
        ("FE80::1%25", "user_linkLocal"),
    ):
        found = world.walk("/v1/changes", {"actor_ip": typed})
        assert found and {c["subject"]["id"] for c in found} == {user_id}, typed
    assert world.walk("/v1/changes", {"actor_ip": "not-an-ip"}) == []

    # A network finds the changes made from each of its addresses, in any notation stored.
    def address_of(change: dict[str, Any]) -> ipaddress.IPv6Address | None:
        """As IPv6, IPv4 mapped into it: so an IPv4 network holds both notations."""
        try:
            found = ipaddress.ip_address((change["actor"]["ip"] or "").strip())
        except ValueError:
            return None
        return ipaddress.IPv6Address(f"::ffff:{found}") if found.version == 4 else found

    def network_of(typed: str) -> ipaddress.IPv6Network:
        found = ipaddress.ip_network(typed, strict=False)
        if found.version == 4:
            return ipaddress.IPv6Network(f"::ffff:{found.network_address}/{96 + found.prefixlen}")
        return found

    def made_from(network: str) -> set[str]:
        return {c["subject"]["id"] for c in world.walk("/v1/changes", {"actor_ip": network})}

    everything = world.walk("/v1/changes", limit=500)
    addresses = [c for c in everything if address_of(c) is not None]
    assert len(addresses) < len(everything)  # the proxy's list is no address
    for network in (
        "2001:db8::/120",
        "2001:DB8::8/127",  # ::8 and ::9
        "2001:db8::7/128",
        "fe80::1%eth0/64",
        "198.51.100.0/24",
        "198.51.100.77/24",  # host bits set: the network they are in
        "198.51.100.4/32",
        "::ffff:198.51.100.0/120",
        "0.0.0.0/0",
        "::/0",
    ):
        expected = [c for c in addresses if address_of(c) in network_of(network)]
        assert expected, network
        assert world.walk("/v1/changes", {"actor_ip": network}, limit=3) == expected, network
    assert world.walk("/v1/changes", {"actor_ip": "::/0"}, limit=3) == addresses
    assert made_from("2001:db8::/120") == {"user_ipv6Actor", "user_ipv6Upper"}
    assert "user_ipv4Mapped" in made_from("198.51.100.0/24")
    assert made_from("192.0.2.0/24") == set()
    # Text that is no address (a proxy's list) is in no network, even one holding its parts.
    assert "user_forwardedList" not in made_from("203.0.113.0/24")
    # With filters that drive (the field's index, the subject's), the network filters.
    for params, wanted in (
        ({"field": "last_name"}, lambda c: c["field"] == "last_name"),
        ({"subject": "user_ipv6Actor"}, lambda c: c["subject"]["id"] == "user_ipv6Actor"),
        ({"type": "user.updated"}, lambda c: c["type"] == "user.updated"),
    ):
        found = world.walk("/v1/changes", {**params, "actor_ip": "2001:db8::/64"}, limit=1)
        expected = [
            c for c in addresses if wanted(c) and address_of(c) in network_of("2001:db8::/64")
        ]
        assert found and found == expected, params
    for refused in ("10.0.0.0/33", "10.0.0.0/", "not/an-address", "2001:db8::/129"):
        answer = world.get("/v1/changes", {"actor_ip": refused})
        assert (answer.status_code, answer.json()["error"]["code"]) == (
            400,
            "invalid_parameter",
        ), refused


@pytest.mark.parametrize("small_rounds", [False, True])
def test_filtered_changes_are_exactly_the_matching_changes_in_order(
    world: World, small_rounds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each filter drives through a different index (the field's, or the history's by object,
    owner, IP or type); in pages of 1 and 3, which end inside an event's changes, each must still
    give exactly the unfiltered walk's matching changes, in its order. (Pages of one, or
    rounds of one history row doubling to at most two rows, make a page take several rounds.)"""
    widest = [0]  # the most history rows' changes one statement looked up
    if small_rounds:
        monkeypatch.setattr(queries, "_FIRST_ROUND_ROWS", 1)
        monkeypatch.setattr(queries, "_MAX_ROUND_ROWS", 2)
        db = world.log.db
        fetchall = db.fetchall

        def counting(statement: str, params: Any = (), **options: Any) -> list[Any]:
            # `IN (%s, ...)` on SQLite; one array on PostgreSQL, its first parameter.
            looked_up = re.search(r'_changes" WHERE position (?:IN \(([^)]*)\)|= ANY)', statement)
            if looked_up:
                count = len(params[0]) if looked_up[1] is None else looked_up[1].count("%s")
                widest[0] = max(widest[0], count)
            return fetchall(statement, params, **options)

        monkeypatch.setattr(db, "fetchall", counting)
    everything = world.walk("/v1/changes", limit=500)
    owned = [c for c in everything if SAMPLE_ORG in (c["owner_id"], c["subject"]["id"])]
    ip = everything[0]["actor"]["ip"]
    # Times are rendered alike (RFC 3339, UTC, milliseconds), so they sort as strings.
    since = sorted({c["occurred_at"] for c in everything if c["owner_id"] == SAMPLE_ORG})[1]
    filters: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        ({"subject": SAMPLE_ORG}, lambda c: SAMPLE_ORG in (c["owner_id"], c["subject"]["id"])),
        ({"subject": FRESH_USER}, lambda c: concerns(c, FRESH_USER)),
        ({"subject": SAMPLE_MEMBER}, lambda c: concerns(c, SAMPLE_MEMBER)),
        ({"field": "first_name"}, lambda c: c["field"] == "first_name"),
        ({"actor_ip": ip}, lambda c: c["actor"]["ip"] == ip),
        ({"type": "user.*"}, lambda c: c["type"].startswith("user.")),
        (
            {"subject": SAMPLE_ORG, "type": "organizationMembership.*", "since": since},
            lambda c: (
                SAMPLE_ORG in (c["owner_id"], c["subject"]["id"])
                and c["type"].startswith("organizationMembership.")
                and c["occurred_at"] >= since
            ),
        ),
        (
            {"field": "first_name", "actor_ip": ip},
            lambda c: c["field"] == "first_name" and c["actor"]["ip"] == ip,
        ),
        (
            {"subject": SAMPLE_ORG, "field": owned[-1]["field"]},
            lambda c: c in owned and c["field"] == owned[-1]["field"],
        ),
        ({"since": since}, lambda c: c["occurred_at"] >= since),
        (
            {"field": "first_name", "since": since},
            lambda c: c["field"] == "first_name" and c["occurred_at"] >= since,
        ),
        (
            {"field": "first_name", "type": "user.updated"},
            lambda c: c["field"] == "first_name" and c["type"] == "user.updated",
        ),
    ]
    for params, matches in filters:
        expected = [c for c in everything if matches(c)]
        assert expected, params
        for limit in (1, 3):
            assert world.walk("/v1/changes", params, limit=limit) == expected, (params, limit)
    if small_rounds:
        assert widest[0] == 2, "rounds must be capped at _MAX_ROUND_ROWS positions"


SAMPLE_MEMBER = "user_3ZdpuWvXe6A43qR6avXueEkyC5D"  # of the sample payloads' membership
MEMBER_OF = {FRESH_MEMBERSHIP: FRESH_USER, "orgmem_3fzLnAnCfOtFoi5ooFvtpBuPdZe": SAMPLE_MEMBER}


def concerns(change: dict[str, Any], subject: str) -> bool:
    """What `/v1/changes?subject=` selects: the object, what it owns, a user's memberships."""
    changed = change["subject"]["id"]
    return subject in (changed, change["owner_id"]) or MEMBER_OF.get(changed) == subject


def _back_and_forth(world: World, count: int) -> None:
    """`count` renames of FRESH_USER whose times go back and forth as positions rise: late
    arrivals, and runs of positions whose latest time is below an earlier run's."""
    minutes = list(range(count))
    random.Random(7).shuffle(minutes)
    for index, minute in enumerate(minutes):
        at = T_UPDATED + 60_000 * (minute + 1)
        user = copy.deepcopy(payload("user.created")["data"])
        user.update(id=FRESH_USER, first_name=f"Name{index}", updated_at=at)
        world.deliver(_envelope("user.updated", user, at, UPDATE_IP))


@pytest.mark.parametrize("batch", [500, 3])
def test_since_starts_at_the_time_marks_and_still_finds_every_late_delivery(
    world: World, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """A first page from `since` starts at the first run of positions whose time mark (the
    latest time applied up to the run's end) reaches it. With runs of 4 positions and times that
    go back and forth, every `since`, alone and with a driving filter, in pages of 500 and 2,
    must give exactly the same walk's rows without `since` that are from that time on. (Steps
    of 3 deliveries carry the latest time from one step to the next, across runs.)"""
    monkeypatch.setattr(base, "TIME_MARK_POSITIONS", 4)
    _back_and_forth(world, 24)
    world.projector.batch_size = batch
    for name in ("events", "objects"):
        world.projector.rebuild(name)
    world.projector.run_once()
    db = world.log.db
    for name in ("events", "objects"):
        marks = db.fetchall(f"SELECT run, latest FROM {active_tables(db, name)['time_marks']}")
        latest = [row["latest"] for row in sorted(marks, key=lambda row: row["run"])]
        assert len(latest) > 10 and latest == sorted(latest), (name, "marks never fall")
    walks = [
        ("/v1/events", {}),
        ("/v1/events", {"type": "user.updated"}),
        ("/v1/events", {"subject": FRESH_USER}),
        ("/v1/changes", {}),
        ("/v1/changes", {"field": "first_name"}),
        ("/v1/changes", {"type": "user.*"}),
    ]
    unbounded = {path + str(params): world.walk(path, params, limit=500) for path, params in walks}
    events = unbounded["/v1/events{}"]
    times = sorted({e["occurred_at"] for e in events})
    for since in [*times, "2100-01-01T00:00:00.000Z"]:
        for path, params in walks:
            expected = [row for row in unbounded[path + str(params)] if row["occurred_at"] >= since]
            found = world.walk(path, {**params, "since": since}, limit=500)
            assert found == expected, (path, params, since)
    since = times[len(times) // 2]
    for path, params in walks:
        expected = [row for row in unbounded[path + str(params)] if row["occurred_at"] >= since]
        assert world.walk(path, {**params, "since": since}, limit=2) == expected, (path, params)
    # The walk does start late: at the run holding the first delivery that late, no earlier.
    first_latest = min(e["position"] for e in events if e["occurred_at"] == times[-1])
    for name in ("events", "objects"):
        start = base.marked_start(db, active_tables(db, name), parse_time(times[-1]))
        assert start == first_latest - first_latest % 4, name


@pytest.mark.parametrize(("projection", "version"), [("events", 2), ("objects", 4)])
def test_since_reads_a_live_generation_from_before_the_time_marks_alike(
    world: World, projection: str, version: int
) -> None:
    """Upgrading: while the version that keeps time marks is built, reads use the live older
    generation, which has none; a first page from `since` must answer exactly as with them."""
    _back_and_forth(world, 12)
    world.projector.run_once()
    times = sorted(e["occurred_at"] for e in world.walk("/v1/events", {"subject": FRESH_USER}))
    sinces = [times[0], times[len(times) // 2], times[-1], "2100-01-01T00:00:00.000Z"]
    walks = [
        (path, {**params, "since": since})
        for since in sinces
        for path, params in (
            ("/v1/events", {}),
            ("/v1/events", {"subject": FRESH_USER}),
            ("/v1/changes", {}),
            ("/v1/changes", {"field": "first_name"}),
        )
    ]
    marked = [world.walk(path, params, limit=3) for path, params in walks]
    assert [bool(rows) for rows in marked] == [True] * 12 + [False] * 4, marked
    db = world.log.db
    live = active_tables(db, projection)
    with db.transaction() as cursor:
        cursor.execute(f"DROP TABLE {live['time_marks']}")
        cursor.execute(
            db.sql(f"UPDATE {db.table('projection_registry')} SET version = %s WHERE name = %s"),
            [version, projection],
        )
    assert active_tables(db, projection).version == version
    unmarked = [world.walk(path, params, limit=3) for path, params in walks]
    for (path, params), old, new in zip(walks, unmarked, marked, strict=True):
        assert old == new, (path, params)


def test_changes_and_history_read_a_live_objects_v3_generation_alike(world: World) -> None:
    """Upgrading: while a newer `objects` is built beside it, reads use the live v3 generation,
    whose change rows carry their event's owner, type, time and IP (and whose history rows have
    no IP). Every filter must answer from it exactly what it answers from the current version."""
    everything = world.walk("/v1/changes", limit=500)
    ip = everything[0]["actor"]["ip"]
    since = sorted({c["occurred_at"] for c in everything})[1]
    queries_to_compare: list[tuple[str, dict[str, Any]]] = [
        ("/v1/changes", {}),
        ("/v1/changes", {"actor_ip": ip}),
        ("/v1/changes", {"type": "user.*"}),
        ("/v1/changes", {"since": since}),
        ("/v1/changes", {"subject": SAMPLE_ORG, "type": "organizationMembership.*"}),
        ("/v1/changes", {"subject": FRESH_USER}),
        ("/v1/changes", {"field": "first_name", "type": "user.updated"}),
        ("/v1/changes", {"field": "first_name", "actor_ip": ip}),
        (f"/v1/users/{FRESH_USER}/history", {}),
    ]
    from_v4 = [world.walk(path, params, limit=3) for path, params in queries_to_compare]
    assert all(from_v4[:-1]), from_v4

    db = world.log.db
    live = active_tables(db, "objects")
    v3 = Tables(db, "objects", live.generation + 1)
    statements = [
        f"CREATE TABLE {v3['history']} ("
        " position BIGINT NOT NULL, object_id TEXT NOT NULL, object_type TEXT NOT NULL,"
        " owner_id TEXT NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL,"
        " occurred_at BIGINT, received_at BIGINT NOT NULL, actor TEXT NOT NULL,"
        " stale INTEGER NOT NULL, PRIMARY KEY (position, object_id))",
        f"CREATE TABLE {v3['changes']} ("
        " position BIGINT NOT NULL, object_id TEXT NOT NULL, field TEXT NOT NULL,"
        " from_value TEXT, to_value TEXT, owner_id TEXT NOT NULL, type TEXT NOT NULL,"
        " occurred_at BIGINT, actor_ip TEXT, PRIMARY KEY (position, object_id, field))",
        f"INSERT INTO {v3['history']} SELECT position, object_id, object_type, owner_id,"
        f" event_id, type, occurred_at, received_at, actor, stale FROM {live['history']}",
        f"INSERT INTO {v3['changes']} SELECT c.position, c.object_id, c.field, c.from_value,"
        " c.to_value, h.owner_id, h.type, h.occurred_at, h.actor_ip"
        f" FROM {live['changes']} c JOIN {live['history']} h ON h.position = c.position",
        *(
            f"CREATE INDEX {v3.index(f'changes_{column}')} ON {v3['changes']} ({column}, position)"
            for column in ("object_id", "field", "owner_id", "actor_ip", "type", "occurred_at")
        ),
        f"CREATE INDEX {v3.index('history_object')} ON {v3['history']} (object_id, position)",
        f"CREATE INDEX {v3.index('history_owner')} ON {v3['history']} (owner_id, position)",
        # Every version had this table as it is (`subject=` finds a user's memberships there).
        f"CREATE TABLE {v3['memberships']} AS SELECT * FROM {live['memberships']}",
        f"UPDATE {db.table('projection_registry')} SET version = 3, generation = "
        f"{v3.generation} WHERE name = 'objects'",
        # As a switch does: reads that remembered the dropped generation look it up again.
        f"DROP TABLE {live['history']}",
        f"DROP TABLE {live['changes']}",
    ]
    with db.transaction() as cursor:
        for statement in statements:
            cursor.execute(statement)
    assert active_tables(db, "objects").version == 3
    from_v3 = [world.walk(path, params, limit=3) for path, params in queries_to_compare]
    for (path, params), old, new in zip(queries_to_compare, from_v3, from_v4, strict=True):
        assert old == new, (path, params)


def test_a_live_objects_generation_without_address_keys_answers_addresses_alike(
    world: World,
) -> None:
    """Upgrading to `objects` v16: while it is built beside it, reads use the live v15
    generation, whose history rows have no address key. An address, in any notation, must find
    there what it finds in v16; a network, which needs the keys, answers 503 to retry later."""
    everything = world.walk("/v1/changes", limit=500)
    ip = everything[0]["actor"]["ip"]
    mapped = f"::ffff:{ip}" if ipaddress.ip_address(ip).version == 4 else ip.upper()
    walks = [
        {"actor_ip": ip},
        {"actor_ip": f"{ip}/32" if "." in ip else f"{ip}/128"},  # one address, not a network
        {"actor_ip": f" {mapped} "},
        {"field": "first_name", "actor_ip": ip},
        {"type": "user.*", "actor_ip": mapped},
    ]
    from_v16 = [world.walk("/v1/changes", params, limit=2) for params in walks]
    assert all(from_v16), from_v16

    db = world.log.db
    live = active_tables(db, "objects")
    with db.transaction() as cursor:
        schema = f'"{db.schema}".' if db.dialect == "postgresql" else ""
        cursor.execute(f"DROP INDEX {schema}{live.index('history_ip')}")
        cursor.execute(f"ALTER TABLE {live['history']} DROP COLUMN actor_ip_key")
        cursor.execute(f"CREATE INDEX {live.index('history_ip')} ON {live['history']} (actor_ip)")
        cursor.execute(
            db.sql(f"UPDATE {db.table('projection_registry')} SET version = 15 WHERE name = %s"),
            ["objects"],
        )
    queries._live_generations.pop(db, None)  # as a switch to another generation would
    assert active_tables(db, "objects").version == 15
    from_v15 = [world.walk("/v1/changes", params, limit=2) for params in walks]
    for params, old, new in zip(walks, from_v15, from_v16, strict=True):
        assert old == new, params
    wide = {"actor_ip": f"{ip}/16" if "." in ip else f"{ip}/64"}
    network = world.get("/v1/changes", wide)
    assert (network.status_code, network.json()["error"]["code"]) == (503, "projection_not_ready")
    assert network.headers["retry-after"]
    # Once v16 is built and live, a network is answered, though this process remembered v15
    # and was asked nothing else (it answered 503 until another read touched v15: review).
    world.projector.rebuild("objects")
    world.projector.run_once()
    assert active_tables(db, "objects").version == 16
    from_network = world.walk("/v1/changes", wide, limit=2)
    assert from_network and {c["subject"]["id"] for c in from_v16[0]} <= {
        c["subject"]["id"] for c in from_network
    }


def test_a_late_snapshot_is_stale_in_history_and_changes_and_leaves_state_alone(
    world: World,
) -> None:
    """SPEC 3 (Order): an older snapshot arriving late is recorded, marked stale, and never
    overwrites newer state; the version after it has its changes taken against it."""
    [created] = [c for c in fresh_deliveries() if c["type"] == "user.created"]
    first_last_name = created["data"]["last_name"]
    late_ip = "192.0.2.9"
    late = dict(created["data"], last_name="Late", updated_at=T_CREATED + 1000)
    world.deliver(_envelope("user.updated", late, T_CREATED + 1000, late_ip))
    world.projector.run_once()

    assert world.ok(f"/v1/users/{FRESH_USER}")["data"]["first_name"] == "Grace"
    assert world.ok(f"/v1/users/{FRESH_USER}")["data"]["last_name"] == first_last_name
    _, renamed, stale = world.walk(f"/v1/users/{FRESH_USER}/history")
    assert (stale["stale"], stale["actor"]["ip"]) == (True, late_ip)
    assert stale["changes"] == [{"field": "last_name", "from": first_last_name, "to": "Late"}]
    assert renamed["stale"] is False and renamed["changes"] == [
        {"field": "first_name", "from": "Ada", "to": "Grace"},
        {"field": "last_name", "from": "Late", "to": first_last_name},
    ]
    changes = world.walk("/v1/changes", {"subject": FRESH_USER, "since": T_CREATED + 1})
    assert [
        (c["event_id"], c["field"], c["from"], c["to"], c["stale"], c["actor"]["ip"])
        for c in changes
    ] == [
        (renamed["event_id"], "first_name", "Ada", "Grace", False, UPDATE_IP),
        (renamed["event_id"], "last_name", "Late", first_last_name, False, UPDATE_IP),
        (stale["event_id"], "last_name", first_last_name, "Late", True, late_ip),
    ]


@pytest.mark.parametrize("late_first", [False, True], ids=["in-order", "later-deletion-first"])
def test_a_second_deletion_keeps_the_deleted_users_last_data(
    world: World, late_first: bool
) -> None:
    """Two deletions of one user (a redelivery under a new svix-id, say): the current state
    stays the last data, flagged deleted, as the state rebuilt from the stream says. (The
    second one, or an earlier one arriving second, replaced it with the deletion stub.)"""
    deletions = [
        _envelope(
            "user.deleted", {"id": FRESH_USER, "object": "user", "deleted": True}, at, UPDATE_IP
        )
        for at in (T_UPDATED + 5000, T_UPDATED + 6000)
    ]
    for deletion in reversed(deletions) if late_first else deletions:
        world.deliver(deletion)
        world.projector.run_once()
    now = world.ok(f"/v1/users/{FRESH_USER}")
    assert now["deleted"] is True and now["data"]["first_name"] == "Grace"
    assert now["updated_at"] == format_time(T_UPDATED)
    rebuilt = world.ok(f"/v1/users/{FRESH_USER}", {"as_of": T_UPDATED + 7000})
    assert rebuilt["data"] == now["data"]


def test_a_late_session_version_can_be_the_last_activity(world: World) -> None:
    """The session ends (no activity reported); then a version as old as its creation arrives
    late, from elsewhere. Equal in time to the creation, it sorts after it by arrival, in the
    fold and in the read model alike: its activity is the session's last."""
    created = next(d for d in fresh_deliveries() if d["type"] == "session.created")
    ended = dict(created["data"], status="ended", latest_activity=None)
    ended["updated_at"] = T_UPDATED
    world.deliver(_envelope("session.ended", ended, T_UPDATED, UPDATE_IP))
    world.projector.run_once()
    [session] = world.walk(f"/v1/users/{FRESH_USER}/sessions")
    assert session["status"] == "ended" and session["latest_activity"]["city"] == "San Francisco"

    elsewhere = dict(created["data"]["latest_activity"], city="Berlin", country="DE")
    late = dict(created["data"], latest_activity=elsewhere)
    world.deliver(_envelope("session.created", late, created["timestamp"], UPDATE_IP))
    world.projector.run_once()
    [session] = world.walk(f"/v1/users/{FRESH_USER}/sessions")
    assert session["status"] == "ended" and session["latest_activity"]["city"] == "Berlin"
    [folded] = world.log.user_state(FRESH_USER).view()["sessions"]
    assert folded["latest_activity"] == session["latest_activity"]


def test_a_late_update_after_a_deletion_is_stale_and_does_not_resurrect(world: World) -> None:
    """SPEC 3 (Order): a deletion is final. An update arriving after it is recorded, stale, and
    taken against the version before it; the deletion keeps its one change and the user stays
    deleted."""
    [created, renamed] = [c for c in fresh_deliveries() if c["type"].startswith("user.")]
    deletion = {"id": FRESH_USER, "object": "user", "deleted": True}
    world.deliver(_envelope("user.deleted", deletion, T_UPDATED + 5000, UPDATE_IP))
    world.projector.run_once()
    late_ip = "192.0.2.10"
    late = dict(renamed["data"], last_name="Late", updated_at=T_UPDATED + 1000)
    world.deliver(_envelope("user.updated", late, T_UPDATED + 1000, late_ip))
    world.projector.run_once()

    assert world.ok(f"/v1/users/{FRESH_USER}")["deleted"] is True
    history = world.walk(f"/v1/users/{FRESH_USER}/history")
    assert [h["type"] for h in history] == [
        "user.created",
        "user.updated",
        "user.deleted",
        "user.updated",
    ]
    deleted, stale = history[2:]
    assert deleted["stale"] is False
    assert deleted["changes"] == [{"field": "deleted", "from": None, "to": True}]
    assert (stale["stale"], stale["actor"]["ip"]) == (True, late_ip)
    last_name = created["data"]["last_name"]
    assert stale["changes"] == [{"field": "last_name", "from": last_name, "to": "Late"}]
    changes = world.walk("/v1/changes", {"subject": FRESH_USER, "since": T_UPDATED + 1})
    assert [(c["event_id"], c["field"], c["to"], c["stale"]) for c in changes] == [
        (deleted["event_id"], "deleted", True, False),
        (stale["event_id"], "last_name", "Late", True),
    ]


def test_projections_status(world: World, settings: Settings, log: AuditLog) -> None:
    listed = world.ok("/v1/projections")
    # A list as every list is: walked with `limit` and `cursor` too, by name.
    walked = world.walk("/v1/projections", limit=1)
    assert walked == sorted(listed["data"], key=lambda row: row["name"])
    assert [row["name"] for row in walked] == ["events", "objects", "timelines"]
    assert listed["next_cursor"] is None  # a list like the others, on one page
    status = listed["data"]
    assert {p["name"] for p in status} == {"events", "objects", "timelines"}
    assert all(p["state"] == "live" and p["lag"] == 0 and p["version"] >= 1 for p in status)
    world.deliver(payload("user.updated"))
    assert all(p["lag"] == 1 for p in world.ok("/v1/projections")["data"])
    without = create_app(settings, log)
    with TestClient(without, raise_server_exceptions=False) as client:
        response = client.get("/v1/projections", headers=AUTH)
        assert response.status_code == 503 and "error" in response.json()


# -- pagination -----------------------------------------------------------------------------------


def test_cursor_walk_visits_every_item_once_while_deliveries_arrive(world: World) -> None:
    events_before = {e["id"] for e in world.walk("/v1/events", limit=500)}
    changes_before = {
        (c["position"], c["subject"]["id"], c["field"])
        for c in world.walk("/v1/changes", limit=500)
    }
    started = threading.Event()
    errors: list[BaseException] = []

    def deliver_more() -> None:
        try:
            for i in range(25):
                body = copy.deepcopy(payload("user.updated"))
                body["data"].update(id=f"user_2concurrent{i:04d}", first_name=f"N{i}")
                world.deliver(body)
                world.projector.run_once()
                started.set()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            started.set()

    writer = threading.Thread(target=deliver_more)
    writer.start()
    started.wait(30)
    seen_events: list[tuple[int, str]] = []
    seen_changes: list[tuple[int, str, str]] = []
    cursors: dict[str, str | None] = {"/v1/events": None, "/v1/changes": None}
    done: set[str] = set()
    while len(done) < 2:
        for path in cursors:
            if path in done:
                continue
            params = {"limit": 2, **({"cursor": cursors[path]} if cursors[path] else {})}
            page = world.ok(path, params)
            for item in page["data"]:
                if path == "/v1/events":
                    seen_events.append((item["position"], item["id"]))
                else:
                    seen_changes.append((item["position"], item["subject"]["id"], item["field"]))
            cursors[path] = page["next_cursor"]
            if cursors[path] is None:
                done.add(path)
    writer.join(60)
    assert not errors, errors

    event_ids = [event_id for _, event_id in seen_events]
    assert len(event_ids) == len(set(event_ids)), "an event was visited twice"
    assert [p for p, _ in seen_events] == sorted(p for p, _ in seen_events)
    assert events_before <= set(event_ids), "an event recorded before the walk was skipped"
    assert len(seen_changes) == len(set(seen_changes)), "a change was visited twice"
    assert seen_changes == sorted(seen_changes)
    assert changes_before <= set(seen_changes)
    # whatever arrived during the walk and was seen is real, and the walk saw some of it
    final = {e["id"] for e in world.walk("/v1/events", limit=500)}
    assert set(event_ids) <= final and len(final) == len(events_before) + 25


def test_bad_parameters_are_400(world: World) -> None:
    cases: list[tuple[str, Any, str]] = [
        ("/v1/events", {"limit": 0}, "invalid_limit"),
        ("/v1/events", {"limit": 10000}, "invalid_limit"),
        ("/v1/events", {"limit": 501}, "invalid_limit"),
        ("/v1/events", {"limit": "ten"}, "invalid_limit"),
        ("/v1/events", {"limit": "-1"}, "invalid_limit"),
        ("/v1/events", {"limit": "1.5"}, "invalid_limit"),
        ("/v1/events", {"limit": ""}, "invalid_limit"),
        ("/v1/events", {"cursor": "not-a-cursor"}, "invalid_cursor"),
        ("/v1/events", {"cursor": encode_cursor("changes", [1, "a", "b"])}, "invalid_cursor"),
        ("/v1/events", {"cursor": encode_cursor("events", ["1"])}, "invalid_cursor"),
        ("/v1/events", {"cursor": encode_cursor("events", [True])}, "invalid_cursor"),
        ("/v1/changes", {"cursor": "eyJrIjoiY2hhbmdlcyJ9"}, "invalid_cursor"),
        ("/v1/events", {"since": "yesterday"}, "invalid_time"),
        ("/v1/events", {"until": "2024-13-45"}, "invalid_time"),
        ("/v1/changes", {"since": "99999999999999999999"}, "invalid_time"),
        (f"/v1/users/{FRESH_USER}", {"as_of": "soon"}, "invalid_time"),
        # Digits to str.isdigit(), not to int() (found by schemathesis).
        (f"/v1/users/{FRESH_USER}", {"as_of": "\u00b2"}, "invalid_time"),
        (f"/v1/users/{FRESH_USER}", {"as_of": "-\u0663"}, "invalid_time"),
        (f"/v1/users/{FRESH_USER}/history", {"until": "x"}, "invalid_time"),
        ("/v1/events", {"since": "--5"}, "invalid_time"),  # was int("--5"): a 500
        # Past year 9999: was answered as of the stream's end, `as_of` written back as null.
        (f"/v1/users/{FRESH_USER}", {"as_of": "999999999999999"}, "invalid_time"),
        ("/v1/events", {"until": str(MAX_EPOCH_MS)}, "invalid_time"),
        ("/v1/changes", {"since": "0001-01-01T00:00:00+01:00"}, "invalid_time"),
        ("/v1/changes", [("field", f"f{n}") for n in range(101)], "invalid_parameter"),
        # An empty filter: `type=` and `field=` were ignored, `subject=` matched nothing.
        ("/v1/events", {"type": ""}, "invalid_parameter"),
        ("/v1/events", [("type", "user.*"), ("type", "")], "invalid_parameter"),
        ("/v1/events", {"subject": ""}, "invalid_parameter"),
        ("/v1/changes", {"field": ""}, "invalid_parameter"),
        ("/v1/changes", {"actor_ip": ""}, "invalid_parameter"),
        ("/v1/changes", {"actor_ip": " "}, "invalid_parameter"),
        ("/v1/changes", {"actor_ip": "10.0.0.0/33"}, "invalid_parameter"),
        ("/v1/events", {"subjet": FRESH_USER}, "unknown_parameter"),
        ("/v1/events", [("limit", 1), ("limit", 2)], "invalid_parameter"),
        ("/v1/events", {"subject": "a\x00b"}, "invalid_parameter"),
        ("/v1/events", {"format": "xml"}, "invalid_format"),
        ("/v1/changes", {"field": "x" * 600}, "invalid_parameter"),
    ]
    for path, params, code in cases:
        response = world.get(path, params)
        assert response.status_code == 400, (path, params, response.text)
        assert response.json()["error"]["code"] == code, (path, params, response.text)
        assert response.json()["error"]["message"]


def test_methods_and_head(world: World) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = world.client.request(method, "/v1/events", headers=AUTH)
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert (
            world.client.request(method, f"/v1/users/{FRESH_USER}", headers=AUTH).status_code == 405
        )
    head = world.client.head(f"/v1/users/{FRESH_USER}", headers=AUTH)
    assert head.status_code == 200 and head.content == b""
    # An export's HEAD has the GET's headers; a streamed GET announces no length (was 0: QA).
    for path in ("/v1/events?format=csv", "/v1/changes?format=ndjson"):
        got, headed = world.get(path), world.client.head(path, headers=AUTH)
        assert (headed.status_code, headed.content) == (200, b""), path
        assert "content-length" not in got.headers and got.content, path
        assert "content-length" not in headed.headers, path
        for name in ("content-type", "content-disposition", "vary"):
            assert headed.headers[name] == got.headers[name], (path, name)
    missing = world.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_reads_beyond_the_read_threads_wait_while_webhooks_and_health_still_answer(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker runs at most READ_THREADS read handlers at once (more would only take turns on
    the GIL); the others queue for a thread, and the webhook and /healthz are not held up."""
    release = threading.Event()
    running = threading.Condition()
    inside = most = 0
    history_page = queries.history_page

    def held_history_page(*args: Any, **kwargs: Any) -> queries.Page:
        nonlocal inside, most
        with running:
            inside += 1
            most = max(most, inside)
            running.notify_all()
        try:
            assert release.wait(30), "the test never released the reads"
            return history_page(*args, **kwargs)
        finally:
            with running:
                inside -= 1

    monkeypatch.setattr(queries, "history_page", held_history_page)
    readers = 6
    statuses: list[int] = []

    def read_history() -> None:
        statuses.append(world.get(f"/v1/users/{FRESH_USER}/history").status_code)

    threads = [threading.Thread(target=read_history) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        with running:
            assert running.wait_for(lambda: inside == READ_THREADS, timeout=30)
        read_threads = world.client.app.state.read_threads
        deadline = time.monotonic() + 30
        while read_threads.waiting < readers - READ_THREADS:
            assert time.monotonic() < deadline, read_threads.waiting
            time.sleep(0.005)
        assert inside == READ_THREADS
        world.deliver(payload("user.updated"))
        assert world.client.get("/healthz").status_code == 200
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=60)
    assert statuses == [200] * readers
    assert most == READ_THREADS


def test_a_read_past_its_deadline_answers_503_and_its_thread_serves_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that does not finish within READ_SECONDS (a stall, a lock) answers 503 with
    Retry-After on either store (test_outage stalls PostgreSQL's wire for real); the thread it
    held serves again once its work ends."""
    release = threading.Event()
    current_object = queries.current_object

    def held_current_object(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(30), "the test never released the read"
        return current_object(*args, **kwargs)

    monkeypatch.setattr(queries, "current_object", held_current_object)
    monkeypatch.setattr(read, "READ_SECONDS", 0.5)
    started = time.monotonic()
    answer = world.get(f"/v1/users/{FRESH_USER}")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "store_unavailable"
    assert answer.headers["Retry-After"].isdigit()
    assert time.monotonic() - started < read.READ_SECONDS + 2
    release.set()
    monkeypatch.setattr(queries, "current_object", current_object)
    for _ in range(2 * READ_THREADS):  # every thread, the one held included
        assert world.get(f"/v1/users/{FRESH_USER}").status_code == 200


def test_an_export_of_one_page_takes_a_read_thread_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export's first chunk, read by its handler, went back to the read threads' queue
    after the status was sent: with both threads taken by slow reads meanwhile, a 200 came
    with no body at all, cut (found by review)."""
    read_threads = world.client.app.state.read_threads
    uses: list[Any] = []
    run = read_threads.run

    async def counted_run(work: Any, seconds: float) -> Any:
        uses.append(work)
        return await run(work, seconds)

    monkeypatch.setattr(read_threads, "run", counted_run)
    indexed = len(world.walk("/v1/events", limit=500))
    assert 0 < indexed < read.EXPORT_PAGE_ROWS
    uses.clear()
    export = world.get("/v1/events", {"format": "ndjson"})
    assert export.status_code == 200
    assert len(export.text.splitlines()) == indexed
    assert len(uses) == 1  # the handler's


def test_a_read_thread_keeps_nothing_of_its_last_read_while_it_waits(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread held its last job until it took the next: a disconnected export's body (its
    first page rendered, some 1.4 MB for 1,000 rows) stayed alive meanwhile (found by review)."""
    read_threads = world.client.app.state.read_threads
    answered: list[weakref.ref[Any]] = []
    run = read_threads.run

    async def noted_run(work: Any, seconds: float) -> Any:
        result = await run(work, seconds)
        answered.append(weakref.ref(result))
        return result

    monkeypatch.setattr(read_threads, "run", noted_run)
    assert world.get(f"/v1/users/{FRESH_USER}").status_code == 200
    gc.collect()
    assert [ref() for ref in answered] == [None]


def test_a_read_that_raises_stop_iteration_answers_500_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio cannot carry StopIteration into a future: such a read hung until its deadline,
    then answered 503 as if the store were down (found by review)."""

    def stops(*args: Any, **kwargs: Any) -> Any:
        raise StopIteration

    monkeypatch.setattr(queries, "current_object", stops)
    monkeypatch.setattr(read, "READ_SECONDS", 10.0)
    started = time.monotonic()
    answer = world.get(f"/v1/users/{FRESH_USER}")
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
    assert time.monotonic() - started < read.READ_SECONDS


# -- tokens ---------------------------------------------------------------------------------------


def test_tokens_are_separated_by_commas_or_spaces_as_the_secrets_are() -> None:
    # "tok1 tok2" was one token with a space in it, which no Bearer header can carry.
    assert parse_tokens(" tok1 tok2,tok3 , ") == ("tok1", "tok2", "tok3")


def test_tokens(world: World, settings: Settings, log: AuditLog) -> None:
    paths = [
        "/v1/events",
        f"/v1/users/{FRESH_USER}",
        "/v1/changes?format=csv",
        "/v1/projections",
        "/v1/nothing-here",
    ]
    for path in paths:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": API_TOKEN},
            {"Authorization": f"Basic {API_TOKEN}"},
            {"Authorization": f"Bearer {API_TOKEN}x"},
        ):
            response = world.client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "unauthorized"
            assert API_TOKEN not in response.text
    for name in ("access_token", "token"):
        response = world.client.get("/v1/events", params={name: API_TOKEN})
        assert response.status_code == 401
        assert "URL" in response.json()["error"]["message"]
    assert world.client.get("/v1/events", headers=AUTH).status_code == 200
    assert (
        world.client.get(
            "/v1/events", headers={"authorization": f"bearer  {API_TOKEN} "}
        ).status_code
        == 200
    )
    # unauthenticated methods other than GET are refused before anything else
    assert world.client.post("/v1/events").status_code == 401
    # outside /v1 no token is needed
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert world.client.get(path).status_code == 200, path

    # several tokens (rotation): each one works; none configured: nobody gets in
    rotated = Settings(
        settings.signing_secrets, settings.database, ("old-token", API_TOKEN), 1 << 20
    )
    with TestClient(create_app(rotated, log), raise_server_exceptions=False) as client:
        for token in ("old-token", API_TOKEN):
            assert (
                client.get("/v1/events", headers={"Authorization": f"Bearer {token}"}).status_code
                == 200
            )
    closed = Settings(settings.signing_secrets, settings.database, (), 1 << 20)
    with TestClient(create_app(closed, log), raise_server_exceptions=False) as client:
        response = client.get("/v1/events", headers=AUTH)
        assert response.status_code == 401
        assert "AUDIT_API_TOKENS" in response.json()["error"]["message"]


# -- exports --------------------------------------------------------------------------------------


def _csv_rows(response: Response) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(response.text)))


def test_exports_stream_the_whole_filtered_result(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read, "EXPORT_PAGE_ROWS", 4)  # many pages, not one
    events = world.walk("/v1/events", limit=500)
    response = world.get("/v1/events", {"format": "csv", "limit": 1})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="events.csv"' in response.headers["content-disposition"]
    rows = _csv_rows(response)
    assert [row["id"] for row in rows] == _ids(events)
    assert json.loads(rows[0]["data"]) == events[0]["data"]
    assert rows[0]["actor_ip"] == (events[0]["actor"]["ip"] or "")

    accept = world.get("/v1/events", {"type": "user.*"}, {"Accept": "text/csv"})
    assert accept.headers["content-type"].startswith("text/csv")
    # One URL, three representations: a cache must key on Accept (JSON pages included).
    for path in ("/v1/events", "/v1/changes"):
        for fmt in ("json", "csv", "ndjson"):
            assert world.get(path, {"format": fmt}).headers["vary"] == "Accept", (path, fmt)
    assert "vary" not in world.get(f"/v1/users/{FRESH_USER}/history").headers
    assert [row["type"] for row in _csv_rows(accept)] == [
        e["type"] for e in events if e["type"].startswith("user.")
    ]
    ndjson = world.get("/v1/events", {"format": "ndjson", "subject": FRESH_USER})
    assert ndjson.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in ndjson.text.splitlines()]
    assert lines == world.walk("/v1/events", {"subject": FRESH_USER})

    changes = world.walk("/v1/changes", limit=500)
    change_rows = _csv_rows(world.get("/v1/changes", {"format": "csv"}))
    assert [(int(r["position"]), r["subject_id"], r["field"]) for r in change_rows] == [
        (c["position"], c["subject"]["id"], c["field"]) for c in changes
    ]
    rename = next(r for r in change_rows if r["subject_id"] == FRESH_USER and r["from"] == '"Ada"')
    assert (rename["to"], rename["actor_ip"], rename["stale"]) == ('"Grace"', UPDATE_IP, "false")
    filtered = world.get("/v1/changes", {"format": "ndjson", "field": "first_name"})
    assert [json.loads(line) for line in filtered.text.splitlines()] == world.walk(
        "/v1/changes", {"field": "first_name"}
    )
    # an export resumes from a cursor
    first = world.ok("/v1/events", {"limit": 3})
    rest = world.get("/v1/events", {"format": "ndjson", "cursor": first["next_cursor"]})
    assert [json.loads(line)["id"] for line in rest.text.splitlines()] == _ids(events)[3:]
    assert world.get("/v1/events", {"format": "json"}).json()["data"] == events[:50]


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("text/csv;q=0.5, application/json", "application/json"),
        ("application/json;q=0, text/csv", "text/csv"),
        ("text/csv; q=0.2, application/x-ndjson; q=0.8", "application/x-ndjson"),
        ("text/*", "text/csv"),
        ("*/*", "application/json"),
        ("*/*;q=0.1, text/csv", "text/csv"),
        ("text/csv;q=0.5, application/json;q=0.5", "application/json"),  # a tie
        ("text/csv;q=0, text/html", "application/json"),  # nothing it has
        ("text/csv;q=nope", "application/json"),
    ],
)
def test_accept_is_negotiated_by_quality(world: World, accept: str, content_type: str) -> None:
    """`Accept: text/csv;q=0.5, application/json` asks for JSON; any mention of JSON won."""
    response = world.get("/v1/events", {"subject": FRESH_USER}, {"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == content_type


def test_csv_cells_cannot_run_as_formulas() -> None:
    assert read.csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert read.csv_cell("@x") == "'@x"
    assert read.csv_cell("-5") == "'-5"
    assert read.csv_cell("plain") == "plain"
    assert read.csv_cell(5) == 5
    # JSON text stays JSON: its `-` starts a number, which a spreadsheet reads as one.
    assert read.csv_cell(read.JsonCell("-5")) == "-5"


def test_a_cursor_belongs_to_its_list_and_filters(world: World) -> None:
    """Reused for another user, or with other filters, a cursor would silently skip what sorts
    before it there: refused. Another limit or an export of the same list take it."""
    page = world.ok("/v1/changes", {"limit": 1})
    cursor = page["next_cursor"]
    assert world.get("/v1/changes", {"limit": 2, "cursor": cursor}).status_code == 200
    assert world.get("/v1/changes", {"format": "csv", "cursor": cursor}).status_code == 200
    for params in ({"field": "first_name"}, {"subject": FRESH_USER}, {"since": 0}):
        response = world.get("/v1/changes", {**params, "cursor": cursor})
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "invalid_cursor"
    history = world.ok(f"/v1/users/{SAMPLE_USER}/history", {"limit": 1})["next_cursor"]
    assert world.get(f"/v1/users/{SAMPLE_USER}/history", {"cursor": history}).status_code == 200
    other = world.get(f"/v1/users/{FRESH_USER}/history", {"cursor": history})
    assert other.status_code == 400 and other.json()["error"]["code"] == "invalid_cursor"


def cursor_contents(cursor: str) -> tuple[str, list[Any]]:
    """The kind and the keyset inside a cursor the API issued, for a test to alter and encode
    again (`encode_cursor`): its kind is bound to the request, so `decode_cursor` needs it."""
    envelope = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    return envelope["k"], envelope["v"]


def test_every_cursor_the_service_issues_it_takes_back(world: World) -> None:
    """A change's path may be 256 characters of any script: escaped as `\\uXXXX`, 117 CJK
    characters made a cursor past the 1,024 the service took, so a walk stopped at the first
    page that ended inside such an event (found by QA)."""
    user_id = "user_2longPathsAuditReadApi001"
    keys = ["設" * 120, "定" * 120, "🙂" * 240, "\x01" * 240, "é" * 240]
    for step in range(2):
        user = dict(payload("user.updated")["data"], id=user_id, updated_at=T_CREATED + step)
        user["unsafe_metadata"] = {key: step for key in keys}
        world.deliver(_envelope("user.updated", user, T_CREATED + step, UPDATE_IP))
    world.projector.run_once()
    everything = world.walk("/v1/changes", {"subject": user_id}, limit=500)
    assert {c["field"] for c in everything} >= {f"unsafe_metadata.{key}" for key in keys}
    assert world.walk("/v1/changes", {"subject": user_id}, limit=1) == everything
    assert world.walk(f"/v1/users/{user_id}/history", limit=1) == world.walk(
        f"/v1/users/{user_id}/history", limit=500
    )


def test_a_tampered_cursor_is_400_not_500(world: World) -> None:
    """Values a database cannot bind (a lone surrogate) or that overflow a BIGINT when
    stepped past, inside a cursor of the right list (found by review). (A NUL is bound as the
    store holds it: tests/test_hostile_input.py.)"""
    kind, _ = cursor_contents(world.ok("/v1/changes", {"limit": 1})["next_cursor"])
    for values in ([1, "\ud800", "x"], [-(2**63), "a", "b"]):
        tampered = encode_cursor(kind, values)
        response = world.get("/v1/changes", {"cursor": tampered})
        assert response.status_code == 400, (values, response.text)
        assert response.json()["error"]["code"] == "invalid_cursor"


# -- secrets out ----------------------------------------------------------------------------------


def sample_secrets() -> list[str]:
    """The literal secret values of the sample payloads (the OTP code apart: see below)."""
    email = payload("email.created")["data"]
    values = [email["body"], email["body_plain"], payload("sms.created")["data"]["message"]]
    values += [
        payload(f"organizationInvitation.{action}")["data"]["url"]
        for action in ("created", "accepted", "revoked")
    ]
    return values


def _needles(values: list[str]) -> list[str]:
    needles: set[str] = set()
    for value in values:
        for form in (
            value,
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            value.replace('"', '""'),
        ):
            needles.add(form)
        needles.update(line.strip() for line in value.splitlines() if len(line.strip()) >= 12)
    return sorted(needles)


def assert_no_secrets(blob: bytes, where: str) -> None:
    text = blob.decode()
    # The code as a number of its own: the sample phone number +12345678901 contains it.
    otp = payload("email.created")["data"]["data"]["otp_code"]
    assert not re.search(rf"(?<![0-9]){re.escape(otp)}(?![0-9])", text), where
    for needle in _needles(sample_secrets()):
        assert needle not in text, (where, needle[:60])


def test_no_response_or_export_contains_secrets(world: World) -> None:
    bodies: dict[str, bytes] = {}

    def collect(path: str, params: Any = None, headers: dict[str, str] | None = None) -> Any:
        response = world.get(path, params, headers)
        assert response.status_code == 200, (path, response.text)
        bodies[f"{path} {params} {headers}"] = response.content
        return (
            response.json()
            if response.headers["content-type"].startswith("application/json")
            else None
        )

    def collect_all(path: str, params: dict[str, Any] | None = None) -> list[Any]:
        items, cursor = [], None
        while True:
            page = collect(
                path, {**(params or {}), "limit": 5, **({"cursor": cursor} if cursor else {})}
            )
            items += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items

    events = collect_all("/v1/events")
    for event in events:
        collect(f"/v1/events/{event['id']}")
    for subject in {e["subject"]["id"] for e in events} | {SAMPLE_USER, SAMPLE_ORG}:
        collect_all("/v1/events", {"subject": subject})
    collect_all("/v1/changes")
    collect_all("/v1/changes", {"field": "url"})
    for user in (SAMPLE_USER, FRESH_USER):
        collect(f"/v1/users/{user}")
    for user, moment in ((SAMPLE_USER, "2024-05-28T08:05:00Z"), (FRESH_USER, T_CREATED + 1)):
        collect(f"/v1/users/{user}", {"as_of": moment})
        for sub in ("history", "sessions", "organizations"):
            collect_all(f"/v1/users/{user}/{sub}")
    collect(f"/v1/organizations/{SAMPLE_ORG}")
    for moment in ("2024-05-28T08:00:00.018Z", "2024-05-28T08:05:00.018Z", "2030-01-01"):
        collect(f"/v1/organizations/{SAMPLE_ORG}", {"as_of": moment})
    for sub in ("members", "invitations", "domains", "history"):
        collect_all(f"/v1/organizations/{SAMPLE_ORG}/{sub}")
    collect_all(f"/v1/sessions/{SAMPLE_SESSION}/timeline")
    for path in ("/v1/events", "/v1/changes"):
        for fmt in ("csv", "ndjson"):
            collect(path, {"format": fmt})
        collect(path, None, {"Accept": "text/csv"})
    # the secrets did reach the store, and the API shows that something was there
    assert any(
        e["data"].get("otp_code") == REDACTED
        or (e["data"].get("data") or {}).get("otp_code") == REDACTED
        for e in events
    )
    assert any(e["type"] == "sms.created" and e["data"]["message"] == REDACTED for e in events)
    assert len(bodies) > 100
    for where, body in bodies.items():
        assert_no_secrets(body, where)


def test_an_application_invitation_url_is_redacted_everywhere(world: World) -> None:
    """`invitation.*` (Clerk's application invitations, besides organization ones) carry the
    sign-up ticket in `url` too. Shaped as ../shared/clerk/payloads/_unverified holds them."""
    ticket = "https://accounts.example.com/sign-up?__clerk_ticket=app_invitation_ticket_7"
    data = {
        "object": "invitation",
        "id": "inv_app_1",
        "email_address": "john.doe@example.com",
        "status": "pending",
        "created_at": T_CREATED,
        "updated_at": T_CREATED,
        "public_metadata": {},
        "revoked": False,
        "url": ticket,
        "expires_at": T_CREATED + 86_400_000,
    }
    for event_type in ("invitation.created", "invitation.revoked"):
        world.deliver({"type": event_type, "object": "event", "timestamp": T_CREATED, "data": data})
    world.deliver({"type": "invitation.accepted", "data": {"id": "inv_app_1", "url": ticket}})
    world.projector.run_once()
    events = world.walk("/v1/events", {"subject": "inv_app_1"})
    assert len(events) == 3 and all(event["data"]["url"] == REDACTED for event in events)
    bodies = [world.get(f"/v1/events/{event['id']}").content for event in events]
    bodies += [world.get("/v1/events", {"format": fmt}).content for fmt in ("csv", "ndjson")]
    bodies.append(world.get("/v1/events", headers={"Accept": "text/csv"}).content)
    for body in bodies:
        assert b"app_invitation_ticket_7" not in body


def test_a_payload_naming_another_kind_keeps_the_secrets_of_both(world: World) -> None:
    """An `sms.created` whose `object` says "email" (or the reverse, or an invitation saying
    "email") was redacted by its `object` alone: the SMS message went out (found by review)."""
    sms = {"id": "sms_other_kind", "object": "email", "message": "sms_secret_1"}
    email = {"id": "idn_other_kind", "object": "sms", "body": "email_secret_2"}
    invitation = {"id": "orginv_other_kind", "object": "email", "url": "ticket_secret_3"}
    invitation["organization_id"] = "org_other_kind"
    for event_type, data in (
        ("sms.created", sms),
        ("email.created", {**email, "body_plain": "email_secret_4"}),
        ("organizationInvitation.created", invitation),
    ):
        world.deliver({"type": event_type, "timestamp": T_CREATED, "data": data})
    world.projector.run_once()
    events = [
        event
        for data in (sms, email, invitation)
        for event in world.walk("/v1/events", {"subject": data["id"]})
    ]
    assert len(events) == 3
    bodies = [world.get(f"/v1/events/{event['id']}").content for event in events]
    bodies += [world.get("/v1/events", {"format": fmt}).content for fmt in ("csv", "ndjson")]
    bodies += [world.get("/v1/changes", {"format": fmt}).content for fmt in ("json", "csv")]
    for body in bodies:
        assert b"_secret_" not in body, body


def test_a_change_keeps_the_secrets_its_snapshots_own_kind_names(world: World) -> None:
    """A versioned object whose `object` names another kind than its type (an invitation
    saying "email"), or a secret kind nested in metadata: its changes showed what
    `/v1/events` hid, since a change's path and type alone do not tell (found by review).
    The change itself is still listed."""
    org_id, user_id = "org_ownKindSecrets", "user_ownKindSecrets"
    invitation = {"id": "orginv_ownKind", "object": "email", "organization_id": org_id}
    invitation.update(body="own_secret_1", body_plain="own_secret_2", email_address="a@b.c")
    user = {"id": user_id, "object": "sms_message", "message": "own_secret_3", "first_name": "A"}
    user["unsafe_metadata"] = {"x": {"object": "email", "body": "own_secret_4", "url": "u"}}
    updated = {**user, "message": "own_secret_5", "first_name": "B", "updated_at": T_UPDATED}
    updated["unsafe_metadata"] = {"x": {"object": "email", "body": "own_secret_6", "url": "v"}}
    for event_type, data, at in (
        ("organizationInvitation.created", invitation, T_CREATED),
        ("user.updated", updated, T_UPDATED),
        ("user.created", user, T_CREATED),  # late: the update's changes are taken again
    ):
        world.deliver({"type": event_type, "timestamp": at, "data": data})
    world.projector.run_once()
    changes = world.walk("/v1/changes", {"subject": user_id}) + world.walk(
        "/v1/changes", {"subject": org_id}
    )
    shown = {(change["field"], change["to"]) for change in changes}
    assert {
        ("body", REDACTED),
        ("body_plain", REDACTED),
        ("message", REDACTED),
        ("unsafe_metadata.x.body", REDACTED),
        ("unsafe_metadata.x.url", "v"),  # not secret for an e-mail
        ("first_name", "B"),
    } <= shown
    bodies = [world.get("/v1/changes", {"format": fmt}).content for fmt in ("json", "csv")]
    bodies += [
        world.get(f"/v1/users/{user_id}/history").content,
        world.get(f"/v1/organizations/{org_id}/history").content,
    ]
    for body in bodies:
        assert b"own_secret_" not in body, body


def test_recorded_changes_hide_what_their_snapshots_kinds_make_secret() -> None:
    """By each holder's own `object`, along the path (identified lists' elements by id);
    keys that only look alike are left alone."""
    old = {"object": "user", "image_url": "a", "u": {"a.url": "x"}, "list": [{"id": "e1"}]}
    new = {"object": "user", "image_url": "b", "u": {"a.url": "y"}}
    new["list"] = [{"id": "e1", "object": "sms_message", "message": "m", "url": "v"}]
    changes = diff(old, new)
    assert redact_recorded_changes(old, new, changes) == [
        {"field": "image_url", "from": "a", "to": "b"},
        {"field": "list.e1.message", "from": None, "to": REDACTED},
        {"field": "list.e1.url", "from": None, "to": "v"},  # not an SMS's secret
        {"field": "u.a\\.url", "from": "x", "to": "y"},  # the key `a.url`
    ]
    assert redact_recorded_changes(old, old, []) == []
    # Each side by its own snapshot: what is no longer an e-mail shows its body (review).
    was_email = {"x": {"object": "email", "body": "secret"}, "l": [{"id": ["no"], "url": 1}]}
    now_note = {"x": {"object": "note", "body": "hello"}, "l": [{"id": ["no"], "url": 2}]}
    assert redact_recorded_changes(was_email, now_note, diff(was_email, now_note)) == [
        {"field": "l", "from": [{"id": ["no"], "url": 1}], "to": [{"id": ["no"], "url": 2}]},
        {"field": "x.body", "from": REDACTED, "to": "hello"},
    ]
    # A long identified list: each list is indexed once, not searched for each change.
    links = {"l": [{"id": f"n{i}", "url": f"https://x/{i}"} for i in range(3000)]}
    recorded = redact_recorded_changes(None, links, diff(None, links))
    assert len(recorded) == 3000 and recorded[-1]["to"].startswith("https://x/")


def test_redaction_rules() -> None:
    email = payload("email.created")["data"]
    redacted = redact(email, "email.created")
    assert redacted["body"] == redacted["body_plain"] == REDACTED
    assert redacted["data"]["otp_code"] == REDACTED
    assert "123456" not in redacted["subject"] and redacted["subject"].endswith("verification code")
    assert redacted["data"]["app"]["url"] == email["data"]["app"]["url"]  # not an invitation url
    assert email["body"] != REDACTED  # a copy: the input is untouched
    sms = redact(payload("sms.created")["data"])
    assert sms["message"] == REDACTED and sms["to_phone_number"] == "+19876543210"
    # A code is scrubbed out of other strings where it stands as itself, not out of a longer
    # run of digits that happens to hold it (found by QA: `+[redacted]78901`).
    coded = dict(payload("sms.created")["data"], data={"otp_code": "123456"})
    coded.update(from_phone_number="+12345678901", message="Code 123456.", slug="x123456y")
    scrubbed = redact(coded, "sms.created")
    assert scrubbed["from_phone_number"] == "+12345678901"
    assert scrubbed["slug"] == f"x{REDACTED}y" and scrubbed["message"] == REDACTED
    assert redact({"otp_code": "1234", "s": "1234 and 12345"}) == {
        "otp_code": REDACTED,
        "s": f"{REDACTED} and 12345",
    }
    link = "https://x.test/v?token=1"
    assert redact({"magic_link": link, "s": f"go {link}2"})["s"] == f"go {REDACTED}2"
    invitation = redact(payload("organizationInvitation.created")["data"])
    assert invitation["url"] == REDACTED and invitation["email_address"] == "jane.doe@acme.com"
    stub = redact({"id": "orginv_1", "url": "https://x/?token=1"}, "organizationInvitation.revoked")
    assert stub["url"] == REDACTED
    assert redact({"object": "user", "url": "u", "message": "m", "body": "b"}) == {
        "object": "user",
        "url": "u",
        "message": "m",
        "body": "b",
    }
    assert redact({"a": [{"b": {"otp_code": 12}}]}) == {"a": [{"b": {"otp_code": REDACTED}}]}
    assert redact_change("organization_invitation", "url", "https://x") == REDACTED
    assert redact_change("organization_invitation", "status", "pending") == "pending"
    assert redact_change("user", "url", "https://x") == "https://x"
    assert redact_change("user", "private_metadata.otp_code", "1") == REDACTED
    assert redact_change("user", "private_metadata", {"otp_code": "1"}) == {"otp_code": REDACTED}
    assert redact_change("sms", "message", None) is None  # nothing there to hide
    assert redact_change("email", ".body", "b") == "b"  # no key `body` of the e-mail
    # Keys are read from an escaped path: `a.otp_code` is a key of its own, not a code, as in
    # the whole value `{"a.otp_code": "1"}`; `a\` followed by `otp_code` is a code.
    assert redact_change("user", "private_metadata.a\\.otp_code", "1") == "1"
    assert redact({"a.otp_code": "1"}) == {"a.otp_code": "1"}
    assert redact_change("user", "private_metadata.a\\\\.otp_code", "1") == REDACTED
    assert redact_change("user", "private_metadata.otp_code\\.x.y", "1") == "1"


def test_a_number_that_holds_its_code_is_shown_whole(world: World) -> None:
    """SPEC 3's secrets out, through the API on both backends: the code is scrubbed where it
    stands as itself, not out of the SMS's own number that holds its digits (found by QA)."""
    sms = dict(payload("sms.created")["data"], id="sms_2numberHoldsItsCode0001")
    sms.update(from_phone_number="+12345678901", message="Your code: 123456.")
    sms["data"] = {"otp_code": "123456"}
    body = _envelope("sms.created", sms, T_CREATED, UPDATE_IP)
    svix_id = new_svix_id()
    assert post(world.client, world.secret, body, svix_id=svix_id).status_code == 200
    world.projector.run_once()
    data = world.ok(f"/v1/events/{svix_id}")["data"]
    assert data["from_phone_number"] == "+12345678901"
    assert data["message"] == data["data"]["otp_code"] == REDACTED


def test_links_in_e_mails_are_secrets_as_codes_are(world: World) -> None:
    """A magic sign-in link, or an invitation's link with its ticket, lets its reader in as an
    OTP code does (found by review: served as sent)."""
    links = {
        "magic_link": "https://accounts.acme.test/v1/verify?token=MAGICSECRET1",
        "action_url": "https://accounts.acme.test/sign-up?__clerk_ticket=TICKETSECRET1",
    }
    for key, link in links.items():
        email = payload("email.created")
        email["data"].update(id=f"ema_{key}", subject=f"Sign in: {link}")
        email["data"]["data"] = {key: link, "app": {"name": "Acme"}}
        assert post(world.client, world.secret, email, svix_id=f"msg_{key}").status_code == 200
    world.projector.run_once()
    served = [world.get(f"/v1/events/msg_{key}").text for key in links] + [
        world.get("/v1/events", {"type": "email.created", "format": fmt}).text
        for fmt in ("csv", "ndjson")
    ]
    for text in served:
        assert "MAGICSECRET1" not in text and "TICKETSECRET1" not in text
    event = world.ok("/v1/events/msg_magic_link")
    assert event["data"]["data"] == {"magic_link": REDACTED, "app": {"name": "Acme"}}
    assert event["data"]["subject"] == f"Sign in: {REDACTED}"


def test_a_user_known_by_sessions_alone_is_a_404_that_says_where_to_look(world: World) -> None:
    """A store begun after a user was created knows them by their sessions until their next
    update: "No user" read as if nothing were recorded about them."""
    session = dict(payload("session.created")["data"], id="sess_only", user_id="user_bySessions")
    world.deliver(_envelope("session.created", session, T_CREATED, UPDATE_IP))
    world.projector.run_once()
    for params, then in (({}, ""), ({"as_of": T_UPDATED}, f" as of {format_time(T_UPDATED)}")):
        missing = world.get("/v1/users/user_bySessions", params)
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == (
            f"No user.* event is recorded for 'user_bySessions'{then}, so its state is unknown;"
            " other events concern it: /v1/events?subject=user_bySessions."
        )
    before = world.get("/v1/users/user_bySessions", {"as_of": T_CREATED - 1})
    assert before.json()["error"]["message"] == (
        f"No user 'user_bySessions' as of {format_time(T_CREATED - 1)}."
    )
    assert _ids(world.walk("/v1/users/user_bySessions/sessions")) == ["sess_only"]
    assert world.get("/v1/users/user_nobody").json()["error"]["message"] == (
        "No user 'user_nobody'."
    )


def test_a_404_while_the_read_models_are_behind_the_store_says_so(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a version's build (minutes at a million events) reads use the old generation,
    and a user created meanwhile was "No user.* event is recorded" (review E)."""
    user = dict(payload("user.created")["data"], id="user_notApplied", updated_at=T_CREATED)
    session = dict(payload("session.created")["data"], id="sess_notApplied")
    applied = world.log.recorder.max_notification_id()
    world.deliver(_envelope("user.created", user, T_CREATED, UPDATE_IP))
    world.deliver(_envelope("session.created", session, T_CREATED, UPDATE_IP))
    stored = world.log.recorder.max_notification_id()

    def message(path: str) -> str:
        missing = world.get(path)
        assert missing.status_code == 404
        return missing.json()["error"]["message"]

    def said(label: str, clerk_id: str, building: str = "", hint: str = "") -> str:
        return (
            f"No {label} '{clerk_id}' in the read model, which is behind the store (applied up"
            f" to position {applied} of {stored}{building}): it may be among the deliveries not"
            f" applied yet.{hint} The lag is at /v1/projections."
        )

    as_of = " as_of reads the store itself."
    assert message("/v1/users/user_notApplied") == said("user", "user_notApplied", hint=as_of)
    assert message("/v1/sessions/sess_notApplied/timeline") == said("session", "sess_notApplied")
    assert world.ok("/v1/users/user_notApplied", {"as_of": T_UPDATED})["data"]["id"] == user["id"]
    # An id with no event waiting is not among them: on a busy store, where the read model is
    # nearly always a few deliveries behind, every mistyped id was said to be.
    assert message("/v1/users/user_nobody") == "No user 'user_nobody'."
    assert message("/v1/organizations/org_nobody") == "No organization 'org_nobody'."
    assert message("/v1/users/sess_notApplied") == (
        "No user 'sess_notApplied': that is the id of a session."
    )
    assert message("/v1/sessions/sess_nobody/timeline") == "No session 'sess_nobody'."
    assert message("/v1/users/user_nobody/sessions") == "No user 'user_nobody'."
    assert message("/v1/users/user_notApplied/sessions") == said("user", "user_notApplied")
    # More pending than it reads through (a build, say): it cannot tell, and says so.
    monkeypatch.setattr(application, "PENDING_LOOKED_THROUGH", 1)
    assert message("/v1/sessions/sess_nobody/timeline") == said("session", "sess_nobody")
    monkeypatch.undo()
    Projector(world.log, [ObjectsRaised()])  # a release with a raised version starts its build
    building = f"; version {ObjectsRaised.version} is being built"
    assert message("/v1/users/user_notApplied") == said("user", "user_notApplied", building, as_of)
    assert message("/v1/users/user_nobody") == "No user 'user_nobody'."
    world.projector.run_once()  # this release's live generation follows beside the build
    assert world.ok("/v1/users/user_notApplied")["data"]["id"] == user["id"]
    assert world.ok("/v1/sessions/sess_notApplied/timeline")["data"]
    assert world.get("/v1/users/user_nobody").json()["error"]["message"] == (
        "No user 'user_nobody'."
    )
    assert message("/v1/sessions/sess_nobody/timeline") == "No session 'sess_nobody'."


def test_a_404_counts_an_object_applied_while_it_asked(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 404 reads the object, then how far its read model is behind, then the object's stream.
    Applied between the first two reads, with the read model still behind on later deliveries,
    a user that existed was answered a flat "No user" (found by review)."""
    for user_id in ("user_appliedMeanwhile", "user_appliedLater"):
        user = dict(payload("user.created")["data"], id=user_id, updated_at=T_CREATED)
        world.deliver(_envelope("user.created", user, T_CREATED, UPDATE_IP))
    db = world.log.db
    objects = world.projector.projections["objects"]
    generation = active_tables(db, "objects").generation
    behind = reads_behind(db, "objects")
    assert behind is not None
    upto = world.log.last_position("user", "user_appliedMeanwhile")
    assert upto is not None
    original = read.reads_behind

    def applied_meanwhile(db: Any, name: str) -> Any:
        monkeypatch.setattr(read, "reads_behind", original)
        world.projector.step(objects, generation, limit=upto - behind.applied)
        return original(db, name)

    monkeypatch.setattr(read, "reads_behind", applied_meanwhile)
    found = world.get("/v1/users/user_appliedMeanwhile")
    assert found.status_code == 200, found.text
    assert read.reads_behind is original  # the race was run
    assert reads_behind(db, "objects") is not None  # and the read model is still behind


def test_metadata_set_to_an_empty_object_is_a_change_as_as_of_shows(world: World) -> None:
    """`as_of` showed `{}` where there had been nothing, and history listed no change."""
    user_id = "user_emptyObjectChange"
    steps = [{"v": None}, {"v": {}}, {"v": {"k": {}}}, {}]
    for step, metadata in enumerate(steps):
        user = dict(payload("user.updated")["data"], id=user_id, updated_at=T_CREATED + step)
        user["public_metadata"] = metadata
        world.deliver(_envelope("user.updated", user, T_CREATED + step, UPDATE_IP))
    world.projector.run_once()
    history = world.walk(f"/v1/users/{user_id}/history")
    metadata_changes = [
        [(c["field"], c["from"], c["to"]) for c in entry["changes"]] for entry in history[1:]
    ]
    assert metadata_changes == [
        [("public_metadata.v", None, {})],
        [("public_metadata.v.k", None, {})],
        [("public_metadata.v", {"k": {}}, None)],
    ]
    # With the changes at its enclosing path, `v`, set and unset whole.
    found = world.walk("/v1/changes", {"subject": user_id, "field": "public_metadata.v.k"})
    assert [(c["field"], c["from"], c["to"]) for c in found] == [
        ("public_metadata.v", None, {}),
        ("public_metadata.v.k", None, {}),
        ("public_metadata.v", {"k": {}}, None),
    ]


def test_an_oauth_redirect_url_being_verified_is_a_secret(world: World) -> None:
    """An external account's verification carries the provider's sign-in URL with its `state`:
    served as sent on every route of the user (found by review)."""
    url = "https://accounts.google.com/o/oauth2/auth?state=OAUTHSTATE1"
    user = dict(payload("user.created")["data"], id="user_oauthRedirect", updated_at=T_CREATED)
    user["external_accounts"] = [
        {
            "object": "external_account",
            "id": "eac_1",
            "provider": "oauth_google",
            "verification": {
                "object": "verification_oauth",
                "status": "unverified",
                "strategy": "oauth_google",
                "external_verification_redirect_url": url,
            },
        }
    ]
    world.deliver(_envelope("user.created", user, T_CREATED, UPDATE_IP))
    verified = copy.deepcopy(user)
    verified["updated_at"] = T_UPDATED
    verified["external_accounts"][0]["verification"].update(
        status="verified", external_verification_redirect_url=None
    )
    world.deliver(_envelope("user.updated", verified, T_UPDATED, UPDATE_IP))
    world.projector.run_once()
    path = "/v1/users/user_oauthRedirect"
    served = [
        world.get(path).text,
        world.get(path, {"as_of": T_CREATED}).text,
        world.get(f"{path}/history").text,
        world.get("/v1/changes", {"subject": "user_oauthRedirect"}).text,
        world.get("/v1/changes", {"subject": "user_oauthRedirect", "format": "csv"}).text,
        world.get("/v1/events", {"subject": "user_oauthRedirect", "format": "ndjson"}).text,
    ]
    for text in served:
        assert "OAUTHSTATE1" not in text
    as_created = world.ok(path, {"as_of": T_CREATED})["data"]["external_accounts"][0]
    assert as_created["verification"]["external_verification_redirect_url"] == REDACTED
    [change] = world.walk(
        "/v1/changes",
        {
            "subject": "user_oauthRedirect",
            "field": "external_accounts.eac_1.verification.external_verification_redirect_url",
            "type": "user.updated",
        },
    )
    assert (change["from"], change["to"]) == (REDACTED, None)


@given(
    object_type=st.sampled_from([None, "user", "email", "sms", "organization_invitation", "x"]),
    field=st.lists(
        st.sampled_from(["", "body", "url", "message", "otp_code", "name"]), min_size=1, max_size=3
    ).map(".".join),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=5),
        st.dictionaries(st.sampled_from(["otp_code", "name"]), st.text(max_size=5), max_size=2),
    ),
)
@example(object_type=None, field=".otp_code", value=False)
def test_a_changed_value_is_redacted_as_it_would_be_in_its_place(
    object_type: str | None, field: str, value: Any
) -> None:
    """A change's value is redacted as the object holding it at `field` would be: through
    `redact` where the path leads to it, and whole when the path goes through a secret."""
    path = field.split(".")
    secret_above = any(key == "otp_code" for key in path[:-1]) or (
        len(path) > 1 and path[0] in SECRET_BY_OBJECT.get(kind_of(object_type) or "", ())
    )
    if secret_above:
        assert redact_change(object_type, field, value) == REDACTED
        return
    nested: Any = value  # an empty key is a key too: "a..b" is {"a": {"": {"b": value}}}
    for key in reversed(path):
        nested = {key: nested}
    expected = redact(nested, object_type)
    for key in path:
        expected = expected[key]
    assert redact_change(object_type, field, value) == expected


def test_a_code_under_an_otp_code_object_is_never_shown(world: World) -> None:
    """`otp_code` is secret wherever it is (SPEC 3), also when a customer's metadata makes it an
    object: the changes beneath it are redacted too, and the pages that show them answer."""
    codes = ["918273", "564738", "192837"]
    user = copy.deepcopy(payload("user.created")["data"])
    user.update(id="user_nested_otp", created_at=T_CREATED, updated_at=T_CREATED)
    user["private_metadata"] = {"otp_code": {"x": codes[0]}}
    updated = dict(user, updated_at=T_UPDATED)
    updated["private_metadata"] = {"otp_code": {"x": codes[1], "y": {"a": codes[2]}}}
    world.deliver(_envelope("user.created", user, T_CREATED, "198.51.100.1"))
    world.deliver(_envelope("user.updated", updated, T_UPDATED, UPDATE_IP))
    world.projector.run_once()
    history = world.walk("/v1/users/user_nested_otp/history")
    changes = world.walk("/v1/changes", {"subject": "user_nested_otp"})
    shown = [
        (change["field"], change["from"], change["to"])
        for change in changes + [c for entry in history for c in entry["changes"]]
        if "otp_code" in change["field"]
    ]
    assert shown and all(to == REDACTED for _, _, to in shown), shown
    export = world.get("/v1/changes", {"subject": "user_nested_otp", "format": "csv"})
    assert export.status_code == 200
    for body in (json.dumps(history), json.dumps(changes), export.text):
        assert not any(code in body for code in codes), body


def test_cursor_codec() -> None:
    token = encode_cursor("events", [42])
    assert decode_cursor("events", token, (int,)) == (42,)
    assert "=" not in token
    for bad in ("", "%%%", "e30", encode_cursor("events", [1, 2]), "x" * 2000):
        with pytest.raises(CursorError):
            decode_cursor("events", bad, (int,))
    with pytest.raises(CursorError):
        decode_cursor("other", token, (int,))
    with pytest.raises(CursorError):
        decode_cursor("events", encode_cursor("events", [2**70]), (int,))
    assert decode_cursor("x", encode_cursor("x", [None, "a"]), ((int, type(None)), str)) == (
        None,
        "a",
    )


def test_time_parameters_use_the_one_parser() -> None:
    assert parse_time("2024-05-28T12:50:00Z") == T_UPDATED
    assert format_time(T_UPDATED) == "2024-05-28T12:50:00.000Z"
    assert parse_time(str(T_UPDATED)) == T_UPDATED
    # An offset's `+` typed unencoded in a URL arrives as a space; a `-` arrives as it is.
    for typed in (
        "2024-05-28T14:50:00 02:00",
        "2024-05-28T14:50:00 0200",
        "2024-05-28T14:50:00 02",
    ):
        assert parse_time(typed) == T_UPDATED, typed
    assert parse_time("2024-05-28T10:50:00-02:00") == T_UPDATED
    for not_an_offset in ("2024-05-28 14:50:00 02:00 extra", "2024-05-28T14 05", "…T14:50 05"):
        with pytest.raises(TimeParseError, match="neither ISO 8601"):
            parse_time(not_an_offset)
    # Exactly the times `format_time` can write back.
    assert format_time(parse_time(str(MAX_EPOCH_MS - 1))) == "9999-12-31T23:59:59.999Z"
    assert format_time(parse_time(str(MIN_EPOCH_MS))) == "0001-01-01T00:00:00.000Z"
    for outside in (str(MAX_EPOCH_MS), str(MIN_EPOCH_MS - 1), "9" * 400):
        with pytest.raises(TimeParseError, match="out of range"):
            parse_time(outside)


@given(millis=st.integers(min_value=0, max_value=MAX_EPOCH_MS - 1))
@example(millis=1_076_858_695_695)
def test_a_formatted_time_parses_back_to_the_same_millisecond(millis: int) -> None:
    """Through a float, 2004-02-15T15:24:55.695Z came back as ...694."""
    assert parse_time(format_time(millis)) == millis
    assert parse_time(format_time(millis).replace("Z", "+02:00")) == millis - 7_200_000


# -- indexes --------------------------------------------------------------------------------------

SYNTHETIC = 20_000


def _fill(log: AuditLog) -> None:
    """Many synthetic rows in the events and changes tables, so that planners prefer indexes.

    The event index's synthetic rows get rows in the event store too (copies of the first
    stored delivery under new stream ids and svix-ids), where reads take each event's payload
    from."""
    db = log.db
    events = active_tables(db, "events")
    objects = active_tables(db, "objects")
    store = db.table(db.events_table)
    if db.dialect == "postgresql":
        series = f"generate_series(1, {SYNTHETIC}) AS c(g)"
        prefix = ""
        stream = "('00000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid"
        ip_key = "lpad(to_hex(g % 200), 2, '0')"
        state = (
            "convert_to(replace(convert_from(d.state, 'UTF8'), d.svix_id, 'msg_syn_' || g), 'UTF8')"
        )
    else:
        series = "c"
        prefix = (
            f"WITH RECURSIVE c(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM c "
            f"WHERE g < {SYNTHETIC}) "
        )
        stream = "printf('00000000-0000-4000-8000-%012d', g)"
        ip_key = "printf('%02x', g % 200)"
        state = "CAST(replace(CAST(d.state AS TEXT), d.svix_id, 'msg_syn_' || g) AS BLOB)"
    first_delivery = (
        f"(SELECT st.topic AS topic, st.state AS state, e.svix_id AS svix_id FROM {store} st"
        f" JOIN {events['events']} e ON e.position = st.{db.position_column}"
        f" ORDER BY e.position LIMIT 1) AS d"
    )
    statements = [
        f"{prefix}INSERT INTO {store}"
        f" ({db.position_column}, originator_id, originator_version, topic, state)"
        f" SELECT 1000000 + g, {stream}, 1, d.topic, {state} FROM {series}, {first_delivery}",
        f"{prefix}INSERT INTO {events['events']} (position, svix_id, type, subject_id,"
        " subject_object, occurred_at, received_at, instance_id, actor, actor_ip)"
        " SELECT 1000000 + g, 'msg_syn_' || g, 'syn.t' || (g % 30),"
        " 'user_syn_' || (g % 3000), 'user', 1800000000000 + g * 1000, 1800000000000 + g * 1000,"
        " 'ins_x', '{}', '10.0.0.' || (g % 200)"
        f" FROM {series}",
        f"{prefix}INSERT INTO {events['event_subjects']} (clerk_id, position)"
        f" SELECT 'user_syn_' || (g % 3000), 1000000 + g FROM {series}",
        f"{prefix}INSERT INTO {objects['changes']} (position, object_id, field, from_value,"
        " to_value)"
        " SELECT 1000000 + g, 'user_syn_' || (g % 3000), 'field_' || (g % 50), '1', '2'"
        f" FROM {series}",
        f"{prefix}INSERT INTO {objects['history']} (position, object_id, object_type, owner_id,"
        " event_id, type, occurred_at, received_at, actor, actor_ip, actor_ip_key, stale)"
        " SELECT 1000000 + g, 'user_syn_' || (g % 3000), 'user', 'org_syn_' || (g % 100),"
        " 'msg_syn_' || g, 'syn.t' || (g % 30), 1800000000000 + g * 1000,"
        " 1800000000000 + g * 1000, '{}', '10.0.0.' || (g % 200),"
        f" '00000000000000000000ffff0a0000' || {ip_key}, 0"
        f" FROM {series}",
    ]
    with db.transaction() as cursor:
        for statement in statements:
            cursor.execute(statement)
        if db.dialect == "postgresql":
            for table in (
                store,
                events["events"],
                events["event_subjects"],
                objects["changes"],
                objects["history"],
            ):
                cursor.execute(f"ANALYZE {table}")
        else:
            cursor.execute("ANALYZE")


def _recording_reads(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Callable[..., list[Any]], list[tuple[str, list[Any]]]]:
    """`db.fetchall` as it was, and the statements read through it from now on (to explain)."""
    original = db.fetchall
    seen: list[tuple[str, list[Any]]] = []

    def recording(statement: str, params: Any = (), **options: Any) -> list[Any]:
        seen.append((statement, list(params)))
        return original(statement, params, **options)

    monkeypatch.setattr(db, "fetchall", recording)
    return original, seen


def test_a_network_drives_when_it_holds_few_rows_and_filters_the_walk_when_many(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite read a network's range through the IP index and sorted it whole for every page
    (250-300 ms for `10.0.0.0/8` at 1,000,000 events, and as much for a rare network beside a
    field: review). Now a network with many rows filters the walk in store order, and one with
    few drives it, ahead of a field. PostgreSQL's planner chooses for itself; the answers must
    be the same on both."""
    db = world.log.db
    _fill(world.log)  # synthetic history rows 1,000,000 + g from 10.0.0.(g % 200)
    original, seen = _recording_reads(db, monkeypatch)
    common, rare = AddressFilter.parse("10.0.0.0/24"), AddressFilter.parse("10.0.0.8/30")
    cases: list[tuple[queries.ChangeFilters, Callable[[int], bool]]] = [
        (queries.ChangeFilters(actor_ip=common), lambda g: True),
        (queries.ChangeFilters(actor_ip=rare), lambda g: 8 <= g % 200 <= 11),
        (
            queries.ChangeFilters(actor_ip=rare, fields=("field_3",)),
            lambda g: 8 <= g % 200 <= 11 and g % 50 == 3,
        ),
        (
            queries.ChangeFilters(actor_ip=common, fields=("field_3",)),
            lambda g: g % 50 == 3,
        ),
    ]
    for filters, wanted in cases:
        seen.clear()
        page = queries.changes_page(db, filters, after=None, limit=50)
        expected = [1_000_000 + g for g in range(1, SYNTHETIC + 1) if wanted(g)][:50]
        assert [change["position"] for change in page.items] == expected, filters
        if db.dialect != "sqlite":
            continue
        for statement, params in [(q, p) for q, p in seen if "actor_ip_key" in q]:
            details = [row["detail"] for row in original(f"EXPLAIN QUERY PLAN {statement}", params)]
            sorted_ranges = [d for d in details if "TEMP B-TREE FOR ORDER BY" in d]
            if filters.actor_ip is common and not filters.fields:  # walked in store order
                assert not sorted_ranges, (statement, details)
            elif filters.actor_ip is rare and filters.fields:  # it drives, ahead of the field
                assert any("history_ip" in d for d in details), (statement, details)


def test_documented_filters_use_indexes(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    db = world.log.db
    _fill(world.log)
    original, seen = _recording_reads(db, monkeypatch)
    mid = 1_800_000_000_000 + SYNTHETIC * 500
    tf = queries.TypeFilter.parse
    calls = [
        lambda: queries.events_page(world.log, queries.EventFilters(), after=None, limit=50),
        lambda: queries.events_page(
            world.log, queries.EventFilters(), after=(1_010_000,), limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(types=tf(["syn.t7"])), after=(1_005_000,), limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(types=tf(["syn.t7", "syn.t8"])), after=None, limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(types=tf(["syn.t1", "nothing.*"])), after=None, limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(types=tf(["syn.*"])), after=None, limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(subject="user_syn_17"), after=(1_000_100,), limit=50
        ),
        lambda: queries.events_page(
            world.log,
            queries.EventFilters(subject="user_syn_17", types=tf(["syn.t17"]), since=mid),
            after=None,
            limit=50,
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(since=mid, until=mid + 60_000), after=None, limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(since=mid), after=None, limit=50
        ),
        lambda: queries.events_page(
            world.log, queries.EventFilters(until=mid), after=None, limit=50, upto=1_015_000
        ),
        lambda: queries.changes_page(db, queries.ChangeFilters(), after=None, limit=50),
        lambda: queries.changes_page(
            db, queries.ChangeFilters(), after=(1_010_000, "user_syn_1", "field_1"), limit=50
        ),
        lambda: queries.changes_page(
            db, queries.ChangeFilters(subject="user_syn_17"), after=None, limit=50
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(fields=("field_3",)),
            after=(1_010_000, "user_syn_1", "field_3"),
            limit=50,
        ),
        lambda: queries.changes_page(
            db, queries.ChangeFilters(fields=("field_3", "field_4")), after=None, limit=50
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(fields=("field_3",)),
            after=(1_010_000, "user_syn_1", "field_3"),
            limit=50,
            upto=1_015_000,
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(actor_ip=AddressFilter.parse("10.0.0.9")),
            after=None,
            limit=50,
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(actor_ip=AddressFilter.parse("10.0.0.9")),
            after=(1_010_000, "user_syn_1", "field_3"),
            limit=50,
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(actor_ip=AddressFilter.parse("10.0.0.8/30")),
            after=None,
            limit=50,
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(fields=("field_3",), actor_ip=AddressFilter.parse("10.0.0.8/30")),
            after=(1_010_000, "user_syn_1", "field_3"),
            limit=50,
        ),
        lambda: queries.changes_page(
            db, queries.ChangeFilters(types=tf(["syn.*", "syn.t3"])), after=None, limit=50
        ),
        lambda: queries.changes_page(
            db, queries.ChangeFilters(since=mid, until=mid + 60_000), after=None, limit=50
        ),
        lambda: queries.changes_page(
            db,
            queries.ChangeFilters(subject="user_syn_17", fields=("field_17",), since=mid),
            after=None,
            limit=50,
        ),
        lambda: queries.history_page(
            db, by="object_id", clerk_id="user_syn_5", after=None, limit=50
        ),
        lambda: queries.history_page(
            db, by="owner_id", clerk_id="org_syn_5", after=(1_010_000, "user_syn_5"), limit=50
        ),
    ]
    big_tables = ("events", "event_subjects", "changes", "history")
    for call in calls:
        seen.clear()
        call()
        for statement, params in seen:
            if not any(f"_{name}" in statement for name in big_tables):
                continue
            if db.dialect == "postgresql":
                plan = "\n".join(
                    row["QUERY PLAN"] for row in original(f"EXPLAIN {statement}", params)
                )
                assert "Seq Scan" not in plan, (statement, plan)
            else:
                details = [
                    row["detail"] for row in original(f"EXPLAIN QUERY PLAN {statement}", params)
                ]
                full_scans = [
                    d
                    for d in details
                    if re.fullmatch(r"SCAN (?!c\b|t\b|b\d+\b|page\b|u\d+\b)\S+", d)
                ]
                assert not full_scans, (statement, details)


def test_before_any_projection_ran_reads_answer_503(client: TestClient) -> None:
    """A store whose read models were never built (no projector has run against it)."""
    response = client.get("/v1/events", headers=AUTH)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "projection_not_ready"
    assert response.headers["retry-after"]
    assert client.get("/v1/users/user_x", headers=AUTH).status_code == 503


def test_reads_follow_a_rebuild_to_the_new_generation(world: World) -> None:
    """The API remembers each projection's live generation; a switch must not break reads."""
    paths = [f"/v1/users/{SAMPLE_USER}", f"/v1/users/{SAMPLE_USER}/history", "/v1/events"]
    before = [world.ok(path) for path in paths]
    for name in world.projector.projections:
        world.projector.rebuild(name)
    world.projector.run_once()
    assert all(row["state"] == "live" for row in world.projector.status())
    assert [world.ok(path) for path in paths] == before


# -- lists of current objects -------------------------------------------------------------------


LISTED_ORG = "org_2listedMembersWalkTest00001"


def _owned_walk_with_a_late_creation(world: World, event_type: str, path: str) -> None:
    """Four objects created 10 s apart, walked two a page; between the pages the creation of
    one created between the first two arrives late (a Svix retry). By creation time it sorted
    behind the cursor and the walk never saw it (review B): SPEC 4 says every item once."""
    family = event_type.split(".", 1)[0]
    prefix = {"session": "sess", "organizationMembership": "orgmem"}[family]

    def created(second: int) -> dict[str, Any]:
        data = copy.deepcopy(payload(event_type)["data"])
        at = T_CREATED + second * 1000
        data.update(id=f"{prefix}_listed{second:03d}", created_at=at, updated_at=at)
        if family == "session":
            data["user_id"] = FRESH_USER
        else:
            data["organization"]["id"] = LISTED_ORG
            data["public_user_data"]["user_id"] = f"user_listed{second:03d}"
        return _envelope(event_type, data, at, UPDATE_IP)

    if family != "session":  # the sample organization is deleted by the samples
        organization = dict(payload("organization.created")["data"], id=LISTED_ORG)
        world.deliver(_envelope("organization.created", organization, T_CREATED, UPDATE_IP))
        world.projector.run_once()
    before = {item["id"] for item in world.walk(path, limit=500)}
    for second in (10, 20, 30, 40):
        world.deliver(created(second))
    world.projector.run_once()
    walked: list[str] = []
    page = world.ok(path, {"limit": 2 + len(before)})
    walked += [item["id"] for item in page["data"]]
    world.deliver(created(15))
    world.projector.run_once()
    while page["next_cursor"]:
        page = world.ok(path, {"limit": 2, "cursor": page["next_cursor"]})
        walked += [item["id"] for item in page["data"]]
    ours = [item for item in walked if item not in before]
    assert sorted(ours) == [f"{prefix}_listed{s:03d}" for s in (10, 15, 20, 30, 40)], walked
    assert len(walked) == len(set(walked)), walked
    # In the order recorded: the late one last.
    assert ours[-1] == f"{prefix}_listed015"


def test_a_walk_of_a_users_sessions_sees_a_session_whose_creation_arrives_late(
    world: World,
) -> None:
    _owned_walk_with_a_late_creation(world, "session.created", f"/v1/users/{FRESH_USER}/sessions")


def test_a_walk_of_an_organizations_members_sees_a_membership_that_arrives_late(
    world: World,
) -> None:
    _owned_walk_with_a_late_creation(
        world, "organizationMembership.created", f"/v1/organizations/{LISTED_ORG}/members"
    )


def test_a_live_objects_v10_generation_lists_by_creation_and_an_upgrade_refuses_its_cursors(
    world: World,
) -> None:
    """Upgrading to `objects` v11: while it is built, reads use the live v10 generation, whose
    current rows have no `listed_at` and whose lists are in creation order. A cursor of one
    order is refused by the other (a silent skip otherwise: their keys are both numbers)."""
    for second in (30, 10, 20):
        data = copy.deepcopy(payload("session.created")["data"])
        at = T_CREATED + second * 1000
        data.update(id=f"sess_v10_{second}", user_id=FRESH_USER, created_at=at, updated_at=at)
        world.deliver(_envelope("session.created", data, at, UPDATE_IP))
    world.projector.run_once()
    path = f"/v1/users/{FRESH_USER}/sessions"
    listed = [item["id"] for item in world.walk(path, limit=2)]
    listed_cursor = world.ok(path, {"limit": 1})["next_cursor"]

    db = world.log.db
    live = active_tables(db, "objects")
    v10 = Tables(db, "objects", live.generation + 1)
    v11 = Tables(db, "objects", live.generation + 2)  # its successor, built meanwhile
    columns = (
        "id, owner_id, user_id, organization_id, status, deleted, created_at, updated_at,"
        " position, view"
    )
    registry = db.table("projection_registry")
    with db.transaction() as cursor:
        for table in ("users", "sessions", "organizations", "memberships"):
            cursor.execute(f"CREATE TABLE {v10[table]} AS SELECT {columns} FROM {live[table]}")
            cursor.execute(f"CREATE TABLE {v11[table]} AS SELECT * FROM {live[table]}")
        cursor.execute(
            f"UPDATE {registry} SET version = 10, generation = {v10.generation}"
            " WHERE name = 'objects'"
        )
        cursor.execute(f"DROP TABLE {live['sessions']}")  # reads look the generation up again
    assert active_tables(db, "objects").version == 10
    by_creation = [item["id"] for item in world.walk(path, limit=2)]
    assert sorted(by_creation) == sorted(listed)
    assert by_creation[-3:] == ["sess_v10_10", "sess_v10_20", "sess_v10_30"]
    assert listed[-3:] == ["sess_v10_30", "sess_v10_10", "sess_v10_20"]
    created_cursor = world.ok(path, {"limit": 1})["next_cursor"]
    # The release before v11 wrote (created_at, id): a walk begun on one of its processes
    # during a rolling upgrade goes on here while v10 serves.
    kind, values = cursor_contents(created_cursor)
    older_cursor = encode_cursor(kind, values[1:])
    assert world.ok(path, {"cursor": older_cursor}) == world.ok(path, {"cursor": created_cursor})
    refused = world.get(path, {"cursor": listed_cursor})
    assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_cursor")
    assert "walk it again" in refused.json()["error"]["message"]

    with db.transaction() as cursor:  # the switch to v11
        cursor.execute(
            f"UPDATE {registry} SET version = {ObjectsProjection.version},"
            f" generation = {v11.generation} WHERE name = 'objects'"
        )
        cursor.execute(f"DROP TABLE {v10['sessions']}")  # reads look the generation up again
    for cursor in (created_cursor, older_cursor):
        refused = world.get(path, {"cursor": cursor})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_cursor")
    assert [item["id"] for item in world.walk(path, limit=2)] == listed


def test_a_domain_deleted_before_its_first_version_arrived_is_deleted_in_every_fold(
    world: World,
) -> None:
    """A domain's deletion stub names no organization; one that arrives before any version
    naming it is stored in the domain's own stream. The read models adopt it when the late
    `organizationDomain.created` arrives, but `audit show org_...` and `as_of` folded the
    organization's stream alone and said the domain still existed (review A)."""
    org_id, domain_id = "org_2stubFirstFoldTest000001", "orgdmn_2stubFirstFoldTest00001"
    organization = dict(payload("organization.created")["data"], id=org_id)
    world.deliver(_envelope("organization.created", organization, T_CREATED, UPDATE_IP))
    stub = {"object": "organization_domain", "id": domain_id, "deleted": True}
    world.deliver(_envelope("organizationDomain.deleted", stub, T_CREATED + 40_000, UPDATE_IP))
    created = dict(
        payload("organizationDomain.created")["data"],
        id=domain_id,
        organization_id=org_id,
        created_at=T_CREATED + 1_000,
        updated_at=T_CREATED + 1_000,
    )
    world.deliver(_envelope("organizationDomain.created", created, T_CREATED + 1_000, UPDATE_IP))
    world.projector.run_once()
    assert world.walk(f"/v1/organizations/{org_id}/domains") == []  # the read model: deleted

    def domains(view: dict[str, Any]) -> list[tuple[str, bool]]:
        return [(domain["id"], domain["deleted"]) for domain in view["domains"]]

    assert domains(world.log.organization_state(org_id).view()) == [(domain_id, True)]
    assert domains(world.log.organization_state(org_id, as_of=T_CREATED + 100_000).view()) == [
        (domain_id, True)
    ]
    # Between its creation and its deletion it existed.
    assert domains(world.log.organization_state(org_id, as_of=T_CREATED + 10_000).view()) == [
        (domain_id, False)
    ]
    # Organizations without such stubs fold their own stream alone, as before.
    assert world.log.organization_state(SAMPLE_ORG).view()["id"] == SAMPLE_ORG


def test_sub_collections_as_of_a_time_are_rebuilt_from_the_stream(world: World) -> None:
    """Who was a member, with which role, on a given day: the CLI's `show --as-of` told it,
    the API did not (review A). Members, invitations, domains and sessions now take `as_of`,
    folded from the stream as the state's `as_of` is."""
    org_id = "org_2asOfListsTest0000000001"
    organization = dict(payload("organization.created")["data"], id=org_id)
    world.deliver(_envelope("organization.created", organization, T_CREATED, UPDATE_IP))

    def membership(member: str, event_type: str, second: int, role: str) -> None:
        data = copy.deepcopy(payload("organizationMembership.created")["data"])
        at = T_CREATED + second * 1000
        data.update(id=member, role=role, created_at=T_CREATED + 1000, updated_at=at)
        if member == "orgmem_asOfSecond":
            data["created_at"] = T_CREATED + 2000
        data["organization"]["id"] = org_id
        data["public_user_data"]["user_id"] = f"user_{member}"
        world.deliver(_envelope(event_type, data, at, UPDATE_IP))

    membership("orgmem_asOfFirst", "organizationMembership.created", 1, "org:member")
    membership("orgmem_asOfSecond", "organizationMembership.created", 2, "org:member")
    membership("orgmem_asOfFirst", "organizationMembership.updated", 20, "org:admin")
    deleted = {"object": "organization_membership", "id": "orgmem_asOfSecond", "deleted": True}
    deleted["organization"] = {"id": org_id}
    world.deliver(
        _envelope("organizationMembership.deleted", deleted, T_CREATED + 30_000, UPDATE_IP)
    )
    world.projector.run_once()
    members = f"/v1/organizations/{org_id}/members"

    def as_of(second: int, path: str = members) -> list[tuple[str, str | None]]:
        walked = world.walk(path, {"as_of": T_CREATED + second * 1000}, limit=1)
        return [(item["id"], item.get("role")) for item in walked]

    assert as_of(10) == [("orgmem_asOfFirst", "org:member"), ("orgmem_asOfSecond", "org:member")]
    assert as_of(25) == [("orgmem_asOfFirst", "org:admin"), ("orgmem_asOfSecond", "org:member")]
    assert as_of(35) == [("orgmem_asOfFirst", "org:admin")]
    # Now, the same items and shapes as the current list.
    assert world.walk(members, {"as_of": MAX_EPOCH_MS - 1}) == world.walk(members)
    before = world.get(members, {"as_of": T_CREATED - 1})
    assert before.status_code == 404
    assert before.json()["error"]["message"] == (
        f"No organization '{org_id}' as of {format_time(T_CREATED - 1)}."
    )
    # A cursor is bound to its list and its as_of.
    cursor = world.ok(members, {"as_of": T_CREATED + 10_000, "limit": 1})["next_cursor"]
    for params in ({"cursor": cursor}, {"cursor": cursor, "as_of": T_CREATED + 25_000}):
        refused = world.get(members, params)
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_cursor")
    for path in ("invitations", "domains"):
        assert world.ok(f"/v1/organizations/{org_id}/{path}", {"as_of": T_CREATED})["data"] == []
    # A user's sessions: their status as of then.
    sessions = f"/v1/users/{FRESH_USER}/sessions"
    ended = copy.deepcopy(payload("session.ended")["data"])
    ended.update(id=FRESH_SESSION, user_id=FRESH_USER, updated_at=T_UPDATED + 1000)
    world.deliver(_envelope("session.ended", ended, T_UPDATED + 1000, UPDATE_IP))
    world.projector.run_once()
    [now] = world.walk(sessions)
    assert world.walk(sessions, {"as_of": MAX_EPOCH_MS - 1}) == [now]

    def statuses(at: int) -> list[tuple[str, str]]:
        return [(item["id"], item["status"]) for item in world.walk(sessions, {"as_of": at})]

    assert statuses(T_UPDATED) == [(FRESH_SESSION, "active")]
    assert statuses(T_UPDATED + 1000) == [(FRESH_SESSION, "ended")] == [(now["id"], now["status"])]
    assert world.get(sessions, {"as_of": T_CREATED - 1}).status_code == 404


def test_a_users_organizations_as_of_a_time_are_rebuilt_from_each_organization(
    world: World,
) -> None:
    """What access a user had on a given day, across organizations: the members of each
    organization were there as of a time, the user's organizations were not (review)."""
    org_id = "org_2usersOrganizationsAsOf1"
    organization = dict(payload("organization.created")["data"], id=org_id)
    world.deliver(_envelope("organization.created", organization, T_CREATED, UPDATE_IP))
    member_id = "orgmem_2usersOrganizationsAsOf"

    def membership(
        event_type: str,
        second: int,
        role: str,
        ids: tuple[str, str, str] = (member_id, org_id, FRESH_USER),
    ) -> None:
        data = copy.deepcopy(payload("organizationMembership.created")["data"])
        at = T_CREATED + second * 1000
        data.update(id=ids[0], role=role, created_at=T_CREATED + 1000, updated_at=at)
        if event_type.endswith(".created"):
            data["created_at"] = at
        data["organization"]["id"] = ids[1]
        data["public_user_data"]["user_id"] = ids[2]
        world.deliver(_envelope(event_type, data, at, UPDATE_IP))

    membership("organizationMembership.created", 1, "org:admin")
    membership("organizationMembership.updated", 5, "org:member")
    # Another organization, whose id sorts first, joined later: pages go by creation.
    other_org = "org_1usersOrganizationsAsOf1"
    world.deliver(
        _envelope("organization.created", dict(organization, id=other_org), T_CREATED, UPDATE_IP)
    )
    other = ("orgmem_1usersOrganizationsAsOf", other_org, FRESH_USER)
    membership("organizationMembership.created", 3, "org:member", other)
    # A user known from a membership only (a store begun after they were created).
    only_member = ("orgmem_3usersOrganizationsAsOf", org_id, "user_2onlyKnownAsAMember01")
    membership("organizationMembership.created", 2, "org:member", only_member)
    world.projector.run_once()
    assert [item["id"] for item in _walk_as_of(world, only_member[2], 2)] == [only_member[0]]
    assert [
        (item["id"], item["organization_id"])
        for item in _walk_as_of(world, FRESH_USER, 4)
        if item["organization_id"] in (org_id, other_org)
    ] == [(member_id, org_id), (other[0], other_org)]
    organizations = f"/v1/users/{FRESH_USER}/organizations"
    now = world.walk(organizations)
    assert (member_id, "org:member") in [(item["id"], item["role"]) for item in now]
    assert world.walk(organizations, {"as_of": MAX_EPOCH_MS - 1}) == now

    def roles(second: int) -> list[tuple[str, str, str]]:
        walked = world.walk(organizations, {"as_of": T_CREATED + second * 1000}, limit=1)
        found = [(item["id"], item["organization_id"], item["role"]) for item in walked]
        return [entry for entry in found if entry[1] == org_id]

    assert roles(0) == []
    assert roles(1) == [(member_id, org_id, "org:admin")]
    assert roles(5) == [(member_id, org_id, "org:member")]
    gone = {"object": "organization_membership", "id": member_id, "deleted": True}
    gone["organization"] = {"id": org_id}
    world.deliver(_envelope("organizationMembership.deleted", gone, T_CREATED + 9_000, UPDATE_IP))
    world.projector.run_once()
    assert roles(5) == [(member_id, org_id, "org:member")]  # what it was, then
    assert roles(9) == []
    assert member_id not in [item["id"] for item in world.walk(organizations)]
    assert world.get(organizations, {"as_of": T_CREATED - 1}).status_code == 404
    # A user known from memberships only, once removed, or once the organization is deleted,
    # was a member of none as of then, as the current list says: not an unknown user (QA).
    gone.update(id=only_member[0])
    world.deliver(_envelope("organizationMembership.deleted", gone, T_CREATED + 7_000, UPDATE_IP))
    in_other = ("orgmem_4usersOrganizationsAsOf", other_org, "user_2onlyKnownAsAMember02")
    membership("organizationMembership.created", 4, "org:member", in_other)
    org_gone = {"object": "organization", "id": other_org, "deleted": True}
    world.deliver(_envelope("organization.deleted", org_gone, T_CREATED + 11_000, UPDATE_IP))
    world.projector.run_once()
    for user_id, was, removed in ((only_member[2], 2, 7), (in_other[2], 4, 11)):
        assert [item["id"] for item in _walk_as_of(world, user_id, was)] != []
        assert _walk_as_of(world, user_id, removed) == []
        assert world.walk(f"/v1/users/{user_id}/organizations") == []
        before = world.get(f"/v1/users/{user_id}/organizations", {"as_of": T_CREATED})
        assert before.status_code == 404, before.text


def test_a_membership_re_sent_under_another_organization_is_one_of_the_users_organizations(
    world: World,
) -> None:
    """A membership's newer version under another organization (never sent by Clerk): the
    first organization's fold still has it, and `as_of` listed it twice when the user had
    another membership there, once from each fold (QA). It is listed once, where its newest
    version is, as in the current list."""
    user_id = "user_2reSentUnderAnotherOrg1"
    moved, stays = "orgmem_2reSentUnderAnotherOrg", "orgmem_3reSentUnderAnotherOrg"
    first, second = "org_2reSentUnderAnotherOrgA", "org_2reSentUnderAnotherOrgB"
    for event_type, member_id, org_id, created, at in (
        ("organizationMembership.created", moved, first, T_CREATED, T_CREATED),
        ("organizationMembership.updated", moved, second, T_CREATED, T_UPDATED),
        ("organizationMembership.created", stays, first, T_CREATED + 1000, T_CREATED + 1000),
    ):
        data = copy.deepcopy(payload("organizationMembership.created")["data"])
        data.update(id=member_id, created_at=created, updated_at=at)
        data["organization"]["id"] = org_id
        data["public_user_data"]["user_id"] = user_id
        world.deliver(_envelope(event_type, data, at, UPDATE_IP))
    world.projector.run_once()
    organizations = f"/v1/users/{user_id}/organizations"
    listed = [(item["id"], item["organization_id"]) for item in world.walk(organizations)]
    assert listed == [(moved, second), (stays, first)]
    for as_of in (T_UPDATED, MAX_EPOCH_MS - 1):
        walked = world.walk(organizations, {"as_of": as_of}, limit=1)
        assert [(item["id"], item["organization_id"]) for item in walked] == listed
    walked = world.walk(organizations, {"as_of": T_UPDATED - 1}, limit=1)
    assert [(item["id"], item["organization_id"]) for item in walked] == [
        (moved, first),
        (stays, first),
    ]
    # The organization it moved to deleted: not listed in the one it left either (review).
    gone = {"object": "organization", "id": second, "deleted": True}
    world.deliver(_envelope("organization.deleted", gone, T_UPDATED + 1000, UPDATE_IP))
    world.projector.run_once()
    listed = [(item["id"], item["organization_id"]) for item in world.walk(organizations)]
    assert listed == [(stays, first)]
    walked = world.walk(organizations, {"as_of": MAX_EPOCH_MS - 1}, limit=1)
    assert [(item["id"], item["organization_id"]) for item in walked] == listed
    # Another moved to a third organization and removed there: listed nowhere.
    third, removed = "org_2reSentUnderAnotherOrgC", "orgmem_4reSentUnderAnotherOrg"
    for event_type, org_id, at in (
        ("organizationMembership.created", first, T_CREATED + 2000),
        ("organizationMembership.updated", third, T_UPDATED),
    ):
        data = copy.deepcopy(payload("organizationMembership.created")["data"])
        data.update(id=removed, created_at=T_CREATED + 2000, updated_at=at)
        data["organization"]["id"] = org_id
        data["public_user_data"]["user_id"] = user_id
        world.deliver(_envelope(event_type, data, at, UPDATE_IP))
    stub = {"object": "organization_membership", "id": removed, "deleted": True}
    stub["organization"] = {"id": third}
    world.deliver(_envelope("organizationMembership.deleted", stub, T_UPDATED + 2000, UPDATE_IP))
    world.projector.run_once()
    assert [(item["id"], item["organization_id"]) for item in world.walk(organizations)] == listed
    walked = world.walk(organizations, {"as_of": MAX_EPOCH_MS - 1}, limit=1)
    assert [(item["id"], item["organization_id"]) for item in walked] == listed


def _walk_as_of(world: World, user_id: str, second: int) -> list[dict[str, Any]]:
    """A user's organizations as of a second after T_CREATED, a page of one at a time."""
    path = f"/v1/users/{user_id}/organizations"
    return world.walk(path, {"as_of": T_CREATED + second * 1000}, limit=1)


def test_a_time_between_two_milliseconds_bounds_as_its_filter_means(world: World) -> None:
    """`since=…00.0005Z` took events at …00.000, which are before it: the parser floored
    every time (review B). A bound that excludes what is before it (`since`, and `until`,
    which is exclusive) now takes the later millisecond; `as_of` the earlier."""
    created = format_time(T_CREATED)
    at = [e for e in world.walk("/v1/events", limit=500) if e["occurred_at"] == created]
    assert at, "the fixture has events at T_CREATED"
    half_past = format_time(T_CREATED).replace("Z", "5Z")  # …00.0005Z
    since = {e["id"] for e in world.walk("/v1/events", {"since": half_past}, limit=500)}
    assert not since & {e["id"] for e in at}
    until = {e["id"] for e in world.walk("/v1/events", {"until": half_past}, limit=500)}
    assert {e["id"] for e in at} <= until
    assert parse_time(half_past) == T_CREATED
    assert parse_time(half_past, round_up=True) == T_CREATED + 1
    assert parse_time(format_time(T_CREATED), round_up=True) == T_CREATED
    # Digits past the microsecond, which the standard parser drops (Go's RFC 3339 writes nine):
    # a time a nanosecond after a millisecond is after it (found by QA).
    second = format_time(T_CREATED).removesuffix(".000Z")
    for finer in (".000000001Z", ".0000001Z", ",000000010Z"):
        assert parse_time(second + finer) == T_CREATED
        assert parse_time(second + finer, round_up=True) == T_CREATED + 1, finer
    assert parse_time(second + ".000000000Z", round_up=True) == T_CREATED
    since = {e["id"] for e in world.walk("/v1/events", {"since": second + ".000000001Z"})}
    assert not since & {e["id"] for e in at}


def test_as_of_lists_hold_what_the_current_lists_hold_whatever_a_payload_says(
    world: World,
) -> None:
    """Found by review D: an `as_of` walk stopped with 400 on its own cursor when a session's
    `created_at` was `true` or 2**63 (its key was the raw value), and an invitation deleted
    (`data.deleted`) stayed in the `as_of` list while the current list left it out."""
    for number, created_at in enumerate((True, 2**63, "yesterday")):
        data = copy.deepcopy(payload("session.created")["data"])
        data.update(id=f"sess_oddCreated{number}", user_id=FRESH_USER, created_at=created_at)
        world.deliver(_envelope("session.created", data, T_CREATED + number, UPDATE_IP))
    org_id = SAMPLE_ORG
    invitation = copy.deepcopy(payload("organizationInvitation.created")["data"])
    invitation.update(id="orginv_deletedLater", organization_id=org_id)
    world.deliver(_envelope("organizationInvitation.created", invitation, T_CREATED, UPDATE_IP))
    gone = dict(invitation, deleted=True, updated_at=T_UPDATED)
    world.deliver(_envelope("organizationInvitation.revoked", gone, T_UPDATED, UPDATE_IP))
    world.projector.run_once()
    for path in (f"/v1/users/{FRESH_USER}/sessions", f"/v1/organizations/{org_id}/invitations"):
        now = world.walk(path, limit=1)
        then = world.walk(path, {"as_of": MAX_EPOCH_MS - 1}, limit=1)
        assert sorted(then, key=lambda item: item["id"]) == sorted(now, key=lambda i: i["id"])
    sessions = [item["id"] for item in world.walk(f"/v1/users/{FRESH_USER}/sessions")]
    assert {f"sess_oddCreated{n}" for n in range(3)} <= set(sessions)


@pytest.mark.parametrize("stub_first", [True, False])
def test_a_membership_deleted_by_a_stub_is_gone_as_of_and_in_show(
    world: World, stub_first: bool
) -> None:
    """A deletion stub that names no organization (`{"id", "object", "deleted"}`) is stored in
    its object's own stream. The current lists dropped the membership, but `as_of` and `audit
    show`, folding the organization's stream alone, listed it as live after its deletion (QA),
    whether the stub came before its first version or after."""
    org_id, user_id = "org_2stubbedAuditReadApi001", "user_2stubbedAuditReadApi01"
    membership_id = "orgmem_2stubbedAuditRead01"
    organization = dict(payload("organization.created")["data"], id=org_id)
    organization.update(created_at=T_CREATED, updated_at=T_CREATED)
    membership = copy.deepcopy(payload("organizationMembership.created")["data"])
    membership.update(id=membership_id, created_at=T_CREATED, updated_at=T_CREATED)
    membership["organization"].update(id=org_id)
    membership["public_user_data"].update(user_id=user_id)
    created = [
        _envelope("organization.created", organization, T_CREATED, UPDATE_IP),
        _envelope("organizationMembership.created", membership, T_CREATED + 1, UPDATE_IP),
    ]
    stub = {"id": membership_id, "object": "organization_membership", "deleted": True}
    deleted = _envelope("organizationMembership.deleted", stub, T_UPDATED, UPDATE_IP)
    for envelope in [deleted, *created] if stub_first else [*created, deleted]:
        world.deliver(envelope)
        world.projector.run_once()
    members = f"/v1/organizations/{org_id}/members"
    organizations = f"/v1/users/{user_id}/organizations"
    for path in (members, organizations):
        assert world.walk(path) == [], path
        assert world.walk(path, {"as_of": T_UPDATED}) == [], path
        assert world.walk(path, {"as_of": MAX_EPOCH_MS - 1}) == [], path
        # Before the deletion, it was there.
        listed = world.walk(path, {"as_of": T_UPDATED - 1})
        assert [m["id"] for m in listed] == [membership_id], path
    assert world.log.organization_state(org_id).view()["members"] == []


def test_a_session_first_seen_without_its_user_is_listed_under_that_user_once_named(
    world: World,
) -> None:
    """A session's stub (an `ended` with no `user_id`) arrives first; the late `created`
    names the user but is not the current version. Adopting the stub set the row's
    `organization_id` to the user and left `user_id` as the session's own id, so the user's
    sessions listed it with `"user_id": "sess_..."` (review D)."""
    session_id, user_id = "sess_2orphanFirstTest0000001", "user_2orphanFirstTest000001"
    ended = {"id": session_id, "object": "session", "status": "ended"}
    ended.update(created_at=T_CREATED, updated_at=T_UPDATED)
    world.deliver(_envelope("session.ended", ended, T_UPDATED, UPDATE_IP))
    world.projector.run_once()
    created = copy.deepcopy(payload("session.created")["data"])
    created.update(id=session_id, user_id=user_id, created_at=T_CREATED, updated_at=T_CREATED)
    world.deliver(_envelope("session.created", created, T_CREATED, UPDATE_IP))
    world.projector.run_once()
    [listed] = world.walk(f"/v1/users/{user_id}/sessions")
    assert (listed["id"], listed["user_id"], listed["status"]) == (session_id, user_id, "ended")
    # The fold takes in the stub too, from its own stream: it said "active" (review F).
    sessions = f"/v1/users/{user_id}/sessions"
    assert world.walk(sessions, {"as_of": MAX_EPOCH_MS - 1}) == [listed]
    [shown] = world.log.user_state(user_id).view()["sessions"]
    assert shown["status"] == "ended"
    row = queries.current_object(world.log.db, "sessions", session_id)
    assert row is not None and row["organization_id"] is None
