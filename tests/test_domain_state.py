"""The fold of User and Organization streams: order independence, staleness, views, actors."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.aggregates.actor import actor_of
from audit.aggregates.changes import diff
from audit.aggregates.delivery import Delivery
from audit.aggregates.state import (
    ACTIVITY_FIELDS,
    HistoryEntry,
    OrganizationState,
    UserState,
    fold_organization,
    fold_user,
)
from tests.domain_factories import (
    ORG_ID,
    USER_ID,
    delivery,
    email_address,
    envelope,
    payload_types,
    sample,
)

T0 = 1_720_000_000_000
USER_PREFIXES = ("user.", "session.", "email.", "sms.")
IMPERSONATOR = {"object": "actor", "sub": "user_2Admin0000000000000000000", "iss": "dashboard"}


def numbered(deliveries: Sequence[Delivery]) -> list[tuple[Delivery, int]]:
    """Deliveries with their stream positions (1-based), in the given order."""
    return [(item, seq) for seq, item in enumerate(deliveries, start=1)]


def without_stale(entries: list[HistoryEntry]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.to_dict().items() if k != "stale"} for entry in entries]


# ---------------------------------------------------------------------------------------------
# Generated histories. A track is one object's events in order; tracks are interleaved, then each
# event gets the next occurred_at. `stamp` marks events whose data.updated_at follows that time.


Event = tuple[str, dict[str, Any], bool]  # (type, data, stamp updated_at with occurred_at)


def _interleave(draw: Callable[..., Any], tracks: list[list[Event]]) -> list[Event]:
    tracks = [list(track) for track in tracks if track]
    merged: list[Event] = []
    while tracks:
        index = draw(st.integers(0, len(tracks) - 1))
        merged.append(tracks[index].pop(0))
        if not tracks[index]:
            tracks.pop(index)
    return merged


def _deliveries(events: list[Event]) -> list[Delivery]:
    result = []
    for index, (event_type, data, stamp) in enumerate(events):
        occurred_at = T0 + 1000 * (index + 1) + 18
        body = envelope(event_type, timestamp=occurred_at)
        body["data"] = copy.deepcopy(data)
        if stamp:
            body["data"]["updated_at"] = occurred_at - 18
        result.append(delivery(body, svix_id=f"msg_{index:03d}"))
    return result


USER_MUTATIONS = (
    "first_name",
    "last_name",
    "plan",
    "add_email",
    "remove_email",
    "reorder_emails",
    "verify",
    "two_factor",
    "banned",
)


def _mutate_user(draw: Callable[..., Any], user: dict[str, Any], mutation: str) -> None:
    emails = user["email_addresses"]
    if mutation in ("first_name", "last_name"):
        user[mutation] = draw(st.sampled_from(["Ann", "Bea", "Cat", None]))
    elif mutation == "plan":
        user["public_metadata"]["plan"] = draw(st.sampled_from(["free", "pro", "team"]))
    elif mutation == "add_email":
        number = len(emails) + draw(st.integers(0, 50))
        if all(e["id"] != f"idn_{number}" for e in emails):
            emails.append(email_address(f"idn_{number}", f"u{number}@example.com"))
    elif mutation == "remove_email" and len(emails) > 1:
        emails.pop()
    elif mutation == "reorder_emails":
        emails.reverse()
    elif mutation == "verify":
        status = emails[0]["verification"]["status"]
        emails[0]["verification"]["status"] = "unverified" if status == "verified" else "verified"
    elif mutation in ("two_factor", "banned"):
        key = "two_factor_enabled" if mutation == "two_factor" else "banned"
        user[key] = not user[key]


@st.composite
def user_histories(draw: Callable[..., Any]) -> list[Delivery]:
    user = envelope("user.created")["data"]
    user["email_addresses"] = [email_address("idn_0", "u0@example.com")]
    user["primary_email_address_id"] = "idn_0"
    user["updated_at"] = T0
    created = draw(st.booleans())
    user_track: list[Event] = [("user.created", copy.deepcopy(user), False)] if created else []
    for _ in range(draw(st.integers(0 if created else 1, 4))):
        for mutation in draw(st.lists(st.sampled_from(USER_MUTATIONS), min_size=1, max_size=3)):
            _mutate_user(draw, user, mutation)
        user["updated_at"] += 1000 * draw(st.integers(0, 2))  # equal updated_at happens
        user_track.append(("user.updated", copy.deepcopy(user), False))

    tracks = [user_track]
    for number in range(draw(st.integers(0, 3))):
        session = envelope("session.created")["data"]
        session["id"] = f"sess_{number}"
        session["client_id"] = f"client_{number}"
        if draw(st.booleans()):
            session["actor"] = dict(IMPERSONATOR)
        track: list[Event] = [("session.created", copy.deepcopy(session), True)]
        end = draw(st.sampled_from([None, "ended", "removed", "revoked"]))
        if end:
            session.update(status=end, latest_activity=None)
            track.append((f"session.{end}", copy.deepcopy(session), True))
        tracks.append(track)
    for kind, count in (("email", draw(st.integers(0, 3))), ("sms", draw(st.integers(0, 2)))):
        messages = []
        for number in range(count):
            data = envelope(f"{kind}.created")["data"]
            data["id"] = f"{kind}_{number}"
            messages.append((f"{kind}.created", data, False))
        tracks.append(messages)

    events = _interleave(draw, tracks)
    if draw(st.booleans()):
        events.append(("user.deleted", envelope("user.deleted")["data"], False))
    return _deliveries(events)


@st.composite
def organization_histories(draw: Callable[..., Any]) -> list[Delivery]:
    organization = envelope("organization.created")["data"]
    organization["updated_at"] = T0
    created = draw(st.booleans())
    org_track: list[Event] = (
        [("organization.created", copy.deepcopy(organization), False)] if created else []
    )
    for _ in range(draw(st.integers(0 if created else 1, 3))):
        field = draw(st.sampled_from(["name", "slug", "plan", "max_allowed_memberships"]))
        if field == "plan":
            organization["public_metadata"]["plan"] = draw(st.sampled_from(["free", "pro"]))
        elif field == "max_allowed_memberships":
            organization[field] = draw(st.integers(1, 20))
        else:
            organization[field] = draw(st.sampled_from(["acme", "acme-2", "beta"]))
        organization["updated_at"] += 1000 * draw(st.integers(0, 2))
        org_track.append(("organization.updated", copy.deepcopy(organization), False))

    tracks = [org_track]
    for number in range(draw(st.integers(0, 3))):
        membership = envelope("organizationMembership.created")["data"]
        membership["id"] = f"orgmem_{number}"
        membership["public_user_data"]["user_id"] = f"user_m{number}"
        track: list[Event] = [("organizationMembership.created", copy.deepcopy(membership), True)]
        if draw(st.booleans()):
            updated = envelope("organizationMembership.updated")["data"]
            membership.update(
                role=updated["role"],
                role_name=updated["role_name"],
                permissions=updated["permissions"],
            )
            track.append(("organizationMembership.updated", copy.deepcopy(membership), True))
        if draw(st.booleans()):
            track.append(("organizationMembership.deleted", copy.deepcopy(membership), False))
        tracks.append(track)
    for number in range(draw(st.integers(0, 2))):
        invitation = envelope("organizationInvitation.created")["data"]
        invitation["id"] = f"orginv_{number}"
        invitation["email_address"] = f"invitee{number}@acme.com"
        track = [("organizationInvitation.created", copy.deepcopy(invitation), True)]
        outcome = draw(st.sampled_from([None, "accepted", "revoked"]))
        if outcome:
            invitation["status"] = outcome
            track.append((f"organizationInvitation.{outcome}", copy.deepcopy(invitation), True))
        tracks.append(track)
    for number in range(draw(st.integers(0, 2))):
        domain = envelope("organizationDomain.created")["data"]
        domain["id"] = f"orgdmn_{number}"
        domain["name"] = f"d{number}.example.com"
        track = [("organizationDomain.created", copy.deepcopy(domain), True)]
        if draw(st.booleans()):
            updated = envelope("organizationDomain.updated")["data"]
            domain.update(verification=updated["verification"], enrollment_mode="manual_invitation")
            track.append(("organizationDomain.updated", copy.deepcopy(domain), True))
        if draw(st.booleans()):
            stub = {"object": "organization_domain", "id": domain["id"], "deleted": True}
            track.append(("organizationDomain.deleted", stub, False))
        tracks.append(track)

    events = _interleave(draw, tracks)
    if draw(st.booleans()):
        events.append(("organization.deleted", envelope("organization.deleted")["data"], False))
    return _deliveries(events)


def _arrival(draw: Callable[..., Any], deliveries: list[Delivery]) -> list[Delivery]:
    """A random permutation with redeliveries (the same Delivery again) mixed in."""
    arrived = list(draw(st.permutations(deliveries)))
    for _ in range(draw(st.integers(0, 4))):
        again = draw(st.sampled_from(deliveries))
        arrived.insert(draw(st.integers(0, len(arrived))), again)
    return arrived


Fold = Callable[..., UserState | OrganizationState]


def _check_order_independence(
    fold: Fold,
    restore: Callable[[dict[str, Any]], UserState | OrganizationState],
    deliveries: list[Delivery],
    data: st.DataObject,
) -> UserState | OrganizationState:
    expected = fold(numbered(deliveries))
    assert not any(entry.stale for entry in expected.history_entries())

    arrived = _arrival(data.draw, deliveries)
    got = fold(numbered(arrived))
    assert got.view() == expected.view()
    assert without_stale(got.history_entries()) == without_stale(expected.history_entries())

    # Rebuilt from a snapshot taken half-way, the state continues exactly as if never stopped.
    cut = data.draw(st.integers(0, len(arrived)))
    first = fold(numbered(arrived[:cut]))
    resumed = restore(json.loads(json.dumps(first.to_snapshot(), allow_nan=False)))
    for item, seq in numbered(arrived)[cut:]:
        resumed.apply(item, seq)
    assert resumed.view() == got.view()
    assert [e.to_dict() for e in resumed.history_entries()] == [
        e.to_dict() for e in got.history_entries()
    ]
    return expected


@settings(max_examples=80)
@given(user_histories(), st.data())
def test_user_state_does_not_depend_on_delivery_order(
    deliveries: list[Delivery], data: st.DataObject
) -> None:
    expected = _check_order_independence(fold_user, UserState.from_snapshot, deliveries, data)
    assert isinstance(expected, UserState)
    view = expected.view()
    users = [d for d in deliveries if d.type.startswith("user.")]
    live = [d for d in users if d.type != "user.deleted"]
    assert view["id"] == USER_ID
    assert view["deleted"] == (users[-1].type == "user.deleted")
    assert view["data"] == (
        {**live[-1].data, "deleted": True} if view["deleted"] else live[-1].data
    )
    assert view["emails"]["count"] == sum(d.type == "email.created" for d in deliveries)
    assert view["sms"]["count"] == sum(d.type == "sms.created" for d in deliveries)
    last_status = {d.data["id"]: d.data["status"] for d in deliveries if d.type.startswith("sess")}
    assert {s["id"]: s["status"] for s in view["sessions"]} == last_status
    assert [e.event_id for e in expected.history_entries()] == [d.svix_id for d in users]


@settings(max_examples=80)
@given(organization_histories(), st.data())
def test_organization_state_does_not_depend_on_delivery_order(
    deliveries: list[Delivery], data: st.DataObject
) -> None:
    restore = OrganizationState.from_snapshot
    expected = _check_order_independence(fold_organization, restore, deliveries, data)
    assert isinstance(expected, OrganizationState)
    view = expected.view()
    assert view["id"] == ORG_ID
    assert view["deleted"] == (deliveries[-1].type == "organization.deleted")
    deleted_members = {d.data["id"] for d in deliveries if d.type.endswith("Membership.deleted")}
    all_members = {d.data["id"] for d in deliveries if d.type.startswith("organizationMember")}
    current = set() if view["deleted"] else all_members - deleted_members
    assert {m["id"] for m in view["members"]} == current
    assert len(expected.history_entries()) == len(deliveries)


# ---------------------------------------------------------------------------------------------
# The reference payloads.


def test_every_user_payload_folds() -> None:
    types = [t for t in payload_types() if t.startswith(USER_PREFIXES)]
    assert len(types) == 10
    state = fold_user(numbered([sample(t) for t in types]))
    view = state.view()
    assert view["id"] == USER_ID
    assert view["deleted"] is True
    assert view["data"]["last_name"] == "Doe Updated"
    assert view["emails"] == {"count": 1, "first_at": 1716883200018, "last_at": 1716883200018}
    assert view["sms"]["count"] == 1
    (session,) = view["sessions"]
    assert session["status"] == "revoked"  # equal keys: the last to arrive is current
    assert session["ended_at"] == 1716883200000
    assert view["first_seen_at"] == 1716883200018
    assert view["last_event_at"] == 1717056000018
    assert [e.type for e in state.history_entries()] == [
        "user.created",
        "user.updated",
        "user.deleted",
    ]


def test_every_organization_payload_folds() -> None:
    types = [t for t in payload_types() if t.startswith("organization")]
    assert len(types) == 12
    state = fold_organization(numbered([sample(t) for t in types]))
    view = state.view()
    assert view["id"] == ORG_ID
    assert view["deleted"] is True
    assert view["data"]["name"] == "Acme Corp Updated"
    assert view["members"] == view["invitations"] == []  # the organization is deleted
    (domain,) = view["domains"]
    assert domain["deleted"] is True
    assert domain["enrollment_mode"] == "automatic_suggestion"
    assert domain["verification"]["status"] == "verified"
    assert {e.object_type for e in state.history_entries()} == {
        "organization",
        "organization_membership",
        "organization_invitation",
        "organization_domain",
    }


@pytest.mark.parametrize("state_class", [UserState, OrganizationState])
def test_snapshots_of_the_reference_payloads_round_trip(state_class: type) -> None:
    user_side = state_class is UserState
    types = [t for t in payload_types() if t.startswith(USER_PREFIXES) == user_side]
    state = state_class()
    for item, seq in numbered([sample(t) for t in types]):
        state.apply(item, seq)
    snapshot = json.loads(json.dumps(state.to_snapshot(), allow_nan=False))
    restored = state_class.from_snapshot(snapshot)
    assert restored.view() == state.view()
    assert restored.to_snapshot() == snapshot


# ---------------------------------------------------------------------------------------------
# Changes, staleness, creation by any event, as_of.

USER_UPDATED_CHANGES = [
    {
        "field": "image_url",
        "from": "https://img.clerk.com/xxxxxx",
        "to": "https://img.clerk.com/yyyyy",
    },
    {"field": "last_active_at", "from": 1716883200000, "to": 1716883500000},
    {"field": "last_name", "from": "Doe", "to": "Doe Updated"},
    {"field": "last_sign_in_at", "from": 1716883200000, "to": 1716883400000},
    {"field": "mfa_enabled_at", "from": None, "to": 1716883200000},
    {
        "field": "profile_image_url",
        "from": "https://img.clerk.com/xxxxxx",
        "to": "https://img.clerk.com/yyyyy",
    },
    {"field": "public_metadata.department", "from": None, "to": "engineering"},
    {"field": "totp_enabled", "from": False, "to": True},
    {"field": "two_factor_enabled", "from": False, "to": True},
    {"field": "username", "from": None, "to": "johndoe"},
]


def test_user_updated_after_created_yields_exactly_the_differing_fields() -> None:
    state = fold_user(numbered([sample("user.created"), sample("user.updated")]))
    created, updated = state.history_entries()
    assert updated.changes == USER_UPDATED_CHANGES
    assert not updated.stale
    assert created.changes == diff(None, sample("user.created").data)
    assert {"field": "first_name", "from": None, "to": "John"} in created.changes


def test_a_stale_update_after_deletion_leaves_the_user_deleted() -> None:
    created, deleted, updated = (
        sample(t) for t in ("user.created", "user.deleted", "user.updated")
    )
    state = UserState()
    state.apply(created, 1)
    state.apply(deleted, 2)
    folded = state.apply(updated, 3)
    assert folded.placement is not None and folded.placement.stale
    assert not folded.placement.becomes_current
    view = state.view()
    assert view["deleted"] is True
    assert view["data"]["deleted"] is True
    entries = {e.type: e for e in state.history_entries()}
    assert entries["user.updated"].stale
    assert entries["user.updated"].changes == USER_UPDATED_CHANGES
    assert entries["user.deleted"].changes == [{"field": "deleted", "from": None, "to": True}]
    assert not entries["user.deleted"].stale


def test_a_late_create_is_stale_and_does_not_overwrite() -> None:
    state = fold_user(numbered([sample("user.updated"), sample("user.created")]))
    assert state.view()["data"] == sample("user.updated").data
    assert state.view()["deleted"] is False
    created, updated = state.history_entries()
    assert created.type == "user.created" and created.stale
    assert not updated.stale
    assert updated.changes == USER_UPDATED_CHANGES  # recomputed against the late predecessor


def test_an_update_about_an_unknown_user_creates_it() -> None:
    state = fold_user(numbered([sample("user.updated")]))
    view = state.view()
    assert view["id"] == USER_ID
    assert view["data"] == sample("user.updated").data
    (entry,) = state.history_entries()
    assert not entry.stale
    assert {"field": "username", "from": None, "to": "johndoe"} in entry.changes


def test_a_session_before_its_user_creates_the_user_stream() -> None:
    state = fold_user(numbered([sample("session.created")]))
    view = state.view()
    assert view["id"] == USER_ID
    assert view["data"] is None and view["deleted"] is False
    assert state.history_entries() == []
    assert view["sessions"] == [
        {
            "id": "sess_3nuW59H6KiTSqRrNmFSG0rZD6BO",
            "status": "active",
            "created_at": 1716883200000,
            "ended_at": None,
            "last_active_at": 1716883200000,
            "latest_activity": {
                "device_type": "desktop",
                "browser_name": "Chrome",
                "browser_version": "128.0.0.0",
                "ip_address": "192.168.1.100",
                "city": "San Francisco",
                "country": "US",
            },
            "actor": None,
            "client_id": "client_3a7lmZIiS9TddLwUfpd47fL0P9Z",
        }
    ]


def test_fold_as_of_between_two_updates_gives_the_first() -> None:
    later = sample(
        "user.updated", svix_id="msg_later", timestamp=1716883900018, first_name="Johnny"
    )
    later.data["updated_at"] = 1716883900000
    stream = numbered([sample("user.created"), sample("user.updated"), later])
    state = fold_user(stream, as_of=1716883600000)
    assert state.view()["data"] == sample("user.updated").data
    assert state.view()["last_event_at"] == 1716883500018
    assert len(state.history_entries()) == 2
    assert fold_user(stream).view()["data"]["first_name"] == "Johnny"
    assert fold_user(stream, as_of=0).view()["data"] is None


def test_a_redelivery_is_a_duplicate() -> None:
    state = UserState()
    item = sample("user.created")
    assert not state.apply(item, 1).duplicate
    again = state.apply(item, 2)
    assert again.duplicate and again.placement is None
    assert len(state.history_entries()) == 1


def test_messages_are_counted_not_versioned() -> None:
    state = UserState()
    folded = state.apply(sample("email.created"), 1)
    assert folded.placement is None
    assert (folded.object_type, folded.object_id) == ("email", "ema_3bCCHa2xXgm3pQ1S4itTtsuLZbP")
    later = sample("email.created", svix_id="msg_2", timestamp=1716883300018, id="ema_2")
    state.apply(later, 2)
    state.apply(sample("sms.created"), 3)
    view = state.view()
    assert view["emails"] == {"count": 2, "first_at": 1716883200018, "last_at": 1716883300018}
    assert view["sms"] == {"count": 1, "first_at": 1716883200018, "last_at": 1716883200018}


def test_a_type_outside_the_folded_ones_folds_into_nothing_even_in_a_known_family() -> None:
    """SPEC 2: an unknown type affects no aggregate, though its prefix is a family's."""
    user = UserState()
    user.apply(sample("user.created"), 1)
    user.apply(sample("email.created"), 2)
    before = user.view()
    for seq, (event_type, known) in enumerate(
        (("email.delivered", "email.created"), ("session.tokenCreated", "session.created")),
        start=3,
    ):
        body = envelope(known, id=f"x_{seq}")
        body["type"] = event_type
        folded = user.apply(delivery(body, svix_id=f"msg_{seq}"), seq)
        assert folded.placement is None
    body = envelope("user.updated", first_name="Changed")
    body["type"] = "user.renamedByRule"
    user.apply(delivery(body, svix_id="msg_9"), 9)
    assert user.view() == before
    organization = OrganizationState()
    organization.apply(sample("organization.created"), 1)
    view = organization.view()
    body = envelope("organizationMembership.created", role="org:owner")
    body["type"] = "organizationMembership.synced"
    assert organization.apply(delivery(body, svix_id="msg_m"), 2).placement is None
    assert organization.view() == view


def test_an_ended_impersonated_session() -> None:
    created = sample("session.created", actor=IMPERSONATOR)
    ended = sample(
        "session.ended", timestamp=1716890000018, actor=IMPERSONATOR, updated_at=1716890000000
    )
    state = fold_user(numbered([ended, created]))
    (session,) = state.view()["sessions"]
    assert session["status"] == "ended"
    assert session["ended_at"] == 1716890000000
    # Clerk's session.ended reports no activity: the last one reported is the session's.
    assert session["latest_activity"] == {
        key: created.data["latest_activity"][key] for key in ACTIVITY_FIELDS
    }
    assert session["actor"] == IMPERSONATOR


def test_sessions_are_sorted_by_creation_then_id() -> None:
    items = [
        sample("session.created", svix_id="m1", id="sess_b", created_at=2),
        sample("session.created", svix_id="m2", id="sess_a", created_at=2),
        sample("session.created", svix_id="m3", id="sess_c", created_at=1),
    ]
    view = fold_user(numbered(items)).view()
    assert [s["id"] for s in view["sessions"]] == ["sess_c", "sess_a", "sess_b"]


# ---------------------------------------------------------------------------------------------
# Organization views.


def test_a_membership_before_its_organization_creates_both() -> None:
    state = fold_organization(numbered([sample("organizationMembership.created")]))
    view = state.view()
    assert view["id"] == ORG_ID
    assert view["data"] is None
    assert view["members"] == [
        {
            "id": "orgmem_3fzLnAnCfOtFoi5ooFvtpBuPdZe",
            "user_id": "user_3ZdpuWvXe6A43qR6avXueEkyC5D",
            "role": "org:member",
            "role_name": "Member",
            "permissions": ["org:posts:read", "org:posts:write"],
            "created_at": 1716883200000,
            "updated_at": 1716883200000,
            "deleted": False,
        }
    ]
    state.apply(sample("organization.created"), 2)
    assert state.view()["data"]["name"] == "Acme Corp"


def test_membership_role_change_is_recorded_with_its_object() -> None:
    items = [sample("organizationMembership.created"), sample("organizationMembership.updated")]
    state = fold_organization(numbered(items))
    (member,) = state.view()["members"]
    assert member["role"] == "org:admin"
    _, updated = state.history_entries()
    assert updated.object_id == "orgmem_3fzLnAnCfOtFoi5ooFvtpBuPdZe"
    assert updated.object_type == "organization_membership"
    fields = [change["field"] for change in updated.changes]
    assert "role" in fields and "permissions" in fields
    assert "organization.updated_at" not in fields


def test_invitation_status_comes_from_the_type_when_the_data_has_none() -> None:
    for action, status in (
        ("created", "pending"),
        ("accepted", "accepted"),
        ("revoked", "revoked"),
    ):
        body = envelope(f"organizationInvitation.{action}")
        del body["data"]["status"]
        state = fold_organization(numbered([delivery(body, svix_id="msg_1")]))
        (invitation,) = state.view()["invitations"]
        assert invitation["status"] == status
        assert invitation["email_address"] == "jane.doe@acme.com"


def test_a_revoked_invitation_is_not_a_deletion() -> None:
    items = [sample("organizationInvitation.created"), sample("organizationInvitation.revoked")]
    state = fold_organization(numbered(items))
    _, revoked = state.history_entries()
    assert revoked.changes == [{"field": "status", "from": "pending", "to": "revoked"}]


# ---------------------------------------------------------------------------------------------
# Actors.


def test_actor_of_a_request() -> None:
    assert actor_of(sample("user.updated")) == {
        "ip": "192.168.1.100",
        "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/128.0.0.0 Safari/537.36",
        "user_id": None,
        "impersonator": None,
    }


def test_empty_or_missing_request_attributes_are_none() -> None:
    body = envelope("user.updated")
    body["event_attributes"]["http_request"] = {"client_ip": "", "user_agent": ""}
    assert actor_of(delivery(body, svix_id="m1"))["ip"] is None
    assert actor_of(delivery(body, svix_id="m1"))["user_agent"] is None
    del body["event_attributes"]
    assert actor_of(delivery(body, svix_id="m2")) == {
        "ip": None,
        "user_agent": None,
        "user_id": None,
        "impersonator": None,
    }


def test_actor_user_ids_named_by_the_event() -> None:
    assert actor_of(sample("session.created"))["user_id"] == USER_ID
    assert actor_of(sample("organizationInvitation.created"))["user_id"] == USER_ID
    assert actor_of(sample("organization.created"))["user_id"] == USER_ID
    # The creator of an object did not necessarily make its later changes.
    assert actor_of(sample("organization.updated"))["user_id"] is None
    assert actor_of(sample("organizationInvitation.revoked"))["user_id"] is None
    assert actor_of(sample("organizationMembership.created"))["user_id"] is None


def test_impersonation_names_the_impersonator() -> None:
    impersonated = sample("session.created", actor=IMPERSONATOR)
    assert actor_of(impersonated)["impersonator"] == IMPERSONATOR["sub"]
    assert actor_of(sample("session.created"))["impersonator"] is None
    entry = fold_user(numbered([sample("user.created")])).history_entries()[0]
    assert entry.actor["ip"] == "192.168.1.100"
