"""Who caused an event, as far as the event itself tells (SPEC 3, "Changes").

Clerk names no actor explicitly. What a delivery does carry: the HTTP request behind it
(`event_attributes.http_request`), the impersonation actor of a session, and on some payloads
the Clerk user who acted. Nothing is guessed beyond that.
"""

from __future__ import annotations

from typing import TypedDict

from audit.aggregates.delivery import Delivery, http_request_of
from audit.aggregates.fields import nonempty_str


class Actor(TypedDict):
    ip: str | None
    user_agent: str | None
    user_id: str | None
    impersonator: str | None


# Ids that name the user who created the object: they name the actor of the creation only
# (the creator of an organization did not necessarily make its later updates).
CREATOR_KEYS = ("inviter_id", "created_by")


def actor_of(delivery: Delivery) -> Actor:
    request = http_request_of(delivery.event_attributes)
    return {
        "ip": nonempty_str(request.get("client_ip")),
        "user_agent": nonempty_str(request.get("user_agent")),
        "user_id": _acting_user_id(delivery),
        "impersonator": _impersonator(delivery),
    }


def _acting_user_id(delivery: Delivery) -> str | None:
    data = delivery.data
    if delivery.type.startswith("session."):
        return nonempty_str(data.get("user_id"))
    if delivery.type.endswith(".created"):
        for key in CREATOR_KEYS:
            found = nonempty_str(data.get(key))
            if found:
                return found
    return None


def _impersonator(delivery: Delivery) -> str | None:
    if not delivery.type.startswith("session."):
        return None
    actor = delivery.data.get("actor")
    return nonempty_str(actor.get("sub")) if isinstance(actor, dict) else None
