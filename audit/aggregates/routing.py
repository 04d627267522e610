"""Which stream owns a delivery, and which Clerk objects a delivery concerns (SPEC 3, "Subjects").

Streams are named by Clerk ids and turned into event-store ids deterministically, so the same
Clerk object always lands in the same stream, in every process, on every backend.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from audit.aggregates.fields import nonempty_str

StreamKind = Literal["user", "organization", "subject"]

# Fixed for ever: stored stream ids are derived from it.
STREAM_NAMESPACE = uuid.UUID("6f1c1f0e-3f7a-5a8e-9d55-1c3c0a7d2b41")

USER_PREFIXES = ("user.", "session.", "email.", "sms.")
ORGANIZATION_PREFIX = "organization"
# Sub-objects whose deletion stub does not name their organization.
SUB_OBJECTS_WITH_STUBS = ("organizationDomain.",)


@dataclass(frozen=True)
class StreamRef:
    """A stream of the event store: the kind of aggregate and the Clerk id it is named by."""

    kind: StreamKind
    clerk_id: str

    @property
    def stream_id(self) -> uuid.UUID:
        return stream_id(self.kind, self.clerk_id)


# A delivery's stream and marker ids are asked for several times on its way in (look-up, append,
# cache); uuid5 hashes with SHA-1 each time, so recent answers are kept.
@lru_cache(maxsize=4096)
def stream_id(kind: StreamKind, clerk_id: str) -> uuid.UUID:
    return uuid.uuid5(STREAM_NAMESPACE, f"{kind}:{clerk_id}")


@lru_cache(maxsize=4096)
def delivery_marker_id(svix_id: str) -> uuid.UUID:
    """The id of the one-event stream that records a svix-id, so a redelivery clashes on insert."""
    return uuid.uuid5(STREAM_NAMESPACE, f"delivery:{svix_id}")


def organization_id_of(event_type: str, data: dict[str, Any]) -> str | None:
    if event_type.startswith("organization."):
        return nonempty_str(data.get("id"))
    if event_type.startswith("organizationMembership."):
        organization = data.get("organization")
        if isinstance(organization, dict):
            return nonempty_str(organization.get("id"))
        return nonempty_str(data.get("organization_id"))
    if event_type.startswith(ORGANIZATION_PREFIX):
        return nonempty_str(data.get("organization_id"))
    return None


def user_id_of(event_type: str, data: dict[str, Any]) -> str | None:
    if event_type.startswith("user."):
        return nonempty_str(data.get("id"))
    if event_type.startswith(USER_PREFIXES):
        return nonempty_str(data.get("user_id"))
    return None


def owning_stream(
    event_type: str, data: dict[str, Any], svix_id: str, known_owner: str | None = None
) -> StreamRef:
    """The stream a delivery is appended to.

    `user.*`, `session.*`, `email.*`, `sms.*` go to the User stream of the user they are about;
    `organization*.*` to the Organization stream of their organization. A sub-object whose payload
    does not name its owner (an `organizationDomain.deleted` stub) goes where `known_owner` says,
    when the caller knows it. Everything else has a stream of its own subject: nothing is dropped.
    """
    if event_type.startswith(USER_PREFIXES):
        user_id = user_id_of(event_type, data)
        if user_id:
            return StreamRef("user", user_id)
    elif event_type.startswith(ORGANIZATION_PREFIX):
        organization_id = organization_id_of(event_type, data) or known_owner
        if organization_id:
            return StreamRef("organization", organization_id)
    subject = nonempty_str(data.get("id"))
    return StreamRef("subject", subject or f"delivery:{svix_id}")


def needs_owner_lookup(event_type: str, data: dict[str, Any]) -> bool:
    """A sub-object stub of an organization that does not name its organization."""
    return (
        event_type.startswith(ORGANIZATION_PREFIX)
        and not event_type.startswith("organization.")
        and organization_id_of(event_type, data) is None
        and nonempty_str(data.get("id")) is not None
    )


def related_ids(event_type: str, data: dict[str, Any]) -> list[str]:
    """Every Clerk id a delivery concerns: its subject first, then the objects it names."""
    ids: list[str] = []

    def add(value: Any) -> None:
        found = nonempty_str(value)
        if found and found not in ids:
            ids.append(found)

    add(data.get("id"))
    add(user_id_of(event_type, data))
    add(organization_id_of(event_type, data))
    add(data.get("user_id"))
    add(data.get("organization_id"))
    add(data.get("session_id"))
    add(data.get("client_id"))
    add(data.get("inviter_id"))
    add(data.get("created_by"))
    public_user_data = data.get("public_user_data")
    if isinstance(public_user_data, dict):
        add(public_user_data.get("user_id"))
    organization = data.get("organization")
    if isinstance(organization, dict):
        add(organization.get("id"))
    actor = data.get("actor")
    if isinstance(actor, dict):
        add(actor.get("sub"))
    # Billing (subscription*, paymentAttempt.*): whom it bills, and what it belongs to.
    payer = data.get("payer")
    if isinstance(payer, dict):
        add(payer.get("user_id"))
        add(payer.get("organization_id"))
        add(payer.get("id"))
    add(data.get("subscription_id"))
    add(data.get("plan_id"))
    # ... and the payment and the subscription's items it names (found by QA: a payment's
    # `cpa_` id found nothing, an item's only its own events).
    add(data.get("payment_id"))
    add(data.get("latest_payment_id"))
    add(data.get("payer_id"))
    for key in ("items", "subscription_items"):
        items = data.get(key)
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    add(item.get("id"))
                    add(item.get("plan_id"))
    return ids
