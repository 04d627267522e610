"""The pure fold of a User stream and of an Organization stream (SPEC 3, "Aggregates").

Each state applies deliveries one by one, in whatever order they were stored, and ends in the same
view whatever that order was: every object's versions are placed by `versions.ObjectVersions`,
counts and time bounds are order-free, and a svix id applied twice is ignored. The states are
plain objects so that aggregates, snapshots and tests can all use them without an event store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from audit.aggregates.actor import Actor, actor_of
from audit.aggregates.changes import Change
from audit.aggregates.delivery import Delivery
from audit.aggregates.fields import nonempty_str
from audit.aggregates.routing import organization_id_of, user_id_of
from audit.aggregates.versions import ObjectVersions, OrderKey, Placement, Version
from audit.timeparse import epoch_ms

# Raised whenever what a fold keeps changes: a snapshot of another version is not read
# (`OutdatedSnapshot`), its stream is folded whole. 2: only FOLDED_TYPES fold; 3: a NUL in a
# change path is written `\0` (`audit.aggregates.changes`).
SNAPSHOT_VERSION = 3


class OutdatedSnapshot(Exception):
    """A snapshot taken by a release whose fold kept something else (SNAPSHOT_VERSION)."""


OBJECT_TYPES = {
    "user": "user",
    "session": "session",
    "email": "email",
    "sms": "sms",
    "organization": "organization",
    "organizationMembership": "organization_membership",
    "organizationInvitation": "organization_invitation",
    "organizationDomain": "organization_domain",
}

# The event types Clerk sends about the objects the aggregates fold: versions of a user, a
# session, an organization and its memberships, invitations and domains, a role, a permission;
# e-mails and SMS counted (../shared/clerk/event_types.json). Any other type, even in one of
# these families, is stored and searchable and folds into nothing (SPEC 2): taken by its prefix
# alone, a `session.*` or `user.*` type Clerk adds later, about another kind of object, made a
# session or a user of it (found by QA).
FOLDED_TYPES = frozenset(
    {
        *(f"user.{action}" for action in ("created", "updated", "deleted")),
        *(f"session.{action}" for action in ("created", "pending", "ended", "removed", "revoked")),
        "email.created",
        "sms.created",
        *(f"organization.{action}" for action in ("created", "updated", "deleted")),
        *(f"organizationMembership.{action}" for action in ("created", "updated", "deleted")),
        *(f"organizationInvitation.{action}" for action in ("created", "accepted", "revoked")),
        *(f"organizationDomain.{action}" for action in ("created", "updated", "deleted")),
        *(
            f"{kind}.{action}"
            for kind in ("role", "permission")
            for action in ("created", "updated", "deleted")
        ),
    }
)

# Session statuses in which a session is still alive; any other status means it ended.
LIVE_SESSION_STATUSES = frozenset({"active", "pending"})
ACTIVITY_FIELDS = (
    "device_type",
    "browser_name",
    "browser_version",
    "ip_address",
    "city",
    "country",
)
INVITATION_STATUS_BY_ACTION = {"created": "pending", "accepted": "accepted", "revoked": "revoked"}


def object_type_of(event_type: str) -> str:
    """The kind of object an event type is about, from its prefix (stubs may lack `object`)."""
    prefix = event_type.split(".", 1)[0]
    return OBJECT_TYPES.get(prefix, prefix)


def folded_type_of(event_type: str) -> str | None:
    """The kind of object a delivery of this type folds into, or None (FOLDED_TYPES)."""
    return object_type_of(event_type) if event_type in FOLDED_TYPES else None


def event_time(delivery: Delivery) -> int:
    """When the event happened: the envelope time, or the receipt time when it has none."""
    return delivery.occurred_at if delivery.occurred_at is not None else delivery.received_at


@dataclass(frozen=True)
class HistoryEntry:
    """One versioned delivery of one object, as the history API shows it."""

    event_id: str
    type: str
    occurred_at: int | None
    object_id: str
    object_type: str
    actor: Actor
    stale: bool
    changes: list[Change]

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "occurred_at": self.occurred_at,
            "object_id": self.object_id,
            "object_type": self.object_type,
            "actor": dict(self.actor),
            "stale": self.stale,
            "changes": [dict(change) for change in self.changes],
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> HistoryEntry:
        return cls(
            event_id=entry["event_id"],
            type=entry["type"],
            occurred_at=entry["occurred_at"],
            object_id=entry["object_id"],
            object_type=entry["object_type"],
            actor=entry["actor"],
            stale=entry["stale"],
            changes=entry["changes"],
        )


@dataclass
class Folded:
    """What applying one delivery did. `placement` is None when nothing was versioned."""

    object_id: str | None
    object_type: str
    placement: Placement | None
    actor: Actor
    duplicate: bool = False


def _history_sort_key(entry: HistoryEntry) -> tuple[int, str]:
    return (entry.occurred_at if entry.occurred_at is not None else 0, entry.event_id)


def created_sort_key(view: dict[str, Any]) -> tuple[int, str]:
    """How a view's lists are ordered: by creation time (none, or not a time, first), then id.
    (A payload's `true` or 2**63 sorted as itself, and its page's key made a cursor the API
    refuses.)"""
    return (epoch_ms(view.get("created_at")) or 0, view["id"])


def _new_counter() -> dict[str, Any]:
    return {"count": 0, "first_at": None, "last_at": None}


def _count(counter: dict[str, Any], at: int) -> None:
    counter["count"] += 1
    counter["first_at"] = at if counter["first_at"] is None else min(counter["first_at"], at)
    counter["last_at"] = at if counter["last_at"] is None else max(counter["last_at"], at)


@dataclass
class _Stream:
    """What both aggregates keep: applied svix ids, history, time bounds, versioned objects."""

    seen: set[str] = field(default_factory=set)
    history: dict[str, HistoryEntry] = field(default_factory=dict)
    first_seen_at: int | None = None
    last_event_at: int | None = None

    def admit(self, delivery: Delivery) -> bool:
        """Record a delivery as applied; False when its svix id already was. Only the types
        the aggregates fold move the stream's time bounds."""
        if delivery.svix_id in self.seen:
            return False
        self.seen.add(delivery.svix_id)
        if delivery.type not in FOLDED_TYPES:
            return True
        at = event_time(delivery)
        self.first_seen_at = at if self.first_seen_at is None else min(self.first_seen_at, at)
        self.last_event_at = at if self.last_event_at is None else max(self.last_event_at, at)
        return True

    def version(
        self,
        versions: ObjectVersions,
        delivery: Delivery,
        seq: int,
        object_id: str,
        actor: Actor,
        *,
        in_history: bool,
    ) -> Placement:
        placement = versions.add(Version.of(delivery, seq))
        if not in_history:
            return placement
        self.history[delivery.svix_id] = HistoryEntry(
            event_id=delivery.svix_id,
            type=delivery.type,
            occurred_at=delivery.occurred_at,
            object_id=object_id,
            object_type=object_type_of(delivery.type),
            actor=actor,
            stale=placement.stale,
            changes=placement.changes,
        )
        successor = self.history.get(placement.successor_id or "")
        if successor is not None and placement.successor_changes is not None:
            self.history[successor.event_id] = replace(
                successor, changes=placement.successor_changes
            )
        return placement

    def entries(self, object_id: str | None = None) -> list[HistoryEntry]:
        entries = [e for e in self.history.values() if object_id in (None, e.object_id)]
        return sorted(entries, key=_history_sort_key)

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "seen": sorted(self.seen),
            "history": [entry.to_dict() for entry in self.entries()],
            "first_seen_at": self.first_seen_at,
            "last_event_at": self.last_event_at,
        }

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> _Stream:
        entries = [HistoryEntry.from_dict(entry) for entry in snapshot["history"]]
        return cls(
            seen=set(snapshot["seen"]),
            history={entry.event_id: entry for entry in entries},
            first_seen_at=snapshot["first_seen_at"],
            last_event_at=snapshot["last_event_at"],
        )


def _objects_snapshot(objects: dict[str, ObjectVersions]) -> dict[str, Any]:
    return {object_id: versions.to_snapshot() for object_id, versions in sorted(objects.items())}


def _objects_from_snapshot(snapshot: dict[str, Any]) -> dict[str, ObjectVersions]:
    return {key: ObjectVersions.from_snapshot(value) for key, value in snapshot.items()}


def _versions_of(objects: dict[str, ObjectVersions], object_id: str) -> ObjectVersions:
    """An object never seen before is created by whatever event names it first."""
    if object_id not in objects:
        objects[object_id] = ObjectVersions()
    return objects[object_id]


class UserState:
    """A user, its sessions, and the e-mails and SMS sent to it."""

    def __init__(self, user_id: str | None = None) -> None:
        self.user_id = user_id
        self.user = ObjectVersions()
        self.sessions: dict[str, ObjectVersions] = {}
        self.emails = _new_counter()
        self.sms = _new_counter()
        self._stream = _Stream()

    def apply(self, delivery: Delivery, seq: int) -> Folded:
        """Fold one delivery; `seq` is its arrival sequence (its position in the stream)."""
        object_id = delivery.subject_id
        object_type = object_type_of(delivery.type)
        actor = actor_of(delivery)
        if not self._stream.admit(delivery):
            return Folded(object_id, object_type, None, actor, duplicate=True)
        if self.user_id is None:
            self.user_id = user_id_of(delivery.type, delivery.data)
        placement: Placement | None = None
        folded = folded_type_of(delivery.type)
        if folded == "user" and object_id:
            placement = self._stream.version(
                self.user, delivery, seq, object_id, actor, in_history=True
            )
        elif folded == "session" and object_id:
            versions = _versions_of(self.sessions, object_id)
            placement = self._stream.version(
                versions, delivery, seq, object_id, actor, in_history=False
            )
        elif folded == "email":
            _count(self.emails, event_time(delivery))
        elif folded == "sms":
            _count(self.sms, event_time(delivery))
        return Folded(object_id, object_type, placement, actor)

    @property
    def deleted(self) -> bool:
        return self.user.deleted

    def history_entries(self, object_id: str | None = None) -> list[HistoryEntry]:
        """The user's own versions, sorted by (occurred_at, event_id)."""
        return self._stream.entries(object_id)

    def view(self) -> dict[str, Any]:
        sessions = [session_view(sid, versions) for sid, versions in self.sessions.items()]
        return {
            "id": self.user_id,
            "deleted": self.user.deleted,
            "data": self.user.as_data(),
            "sessions": sorted(sessions, key=created_sort_key),
            "emails": dict(self.emails),
            "sms": dict(self.sms),
            "first_seen_at": self._stream.first_seen_at,
            "last_event_at": self._stream.last_event_at,
        }

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "snapshot_version": SNAPSHOT_VERSION,
            "user_id": self.user_id,
            "user": self.user.to_snapshot(),
            "sessions": _objects_snapshot(self.sessions),
            "emails": dict(self.emails),
            "sms": dict(self.sms),
            **self._stream.to_snapshot(),
        }

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> UserState:
        state = cls(snapshot["user_id"])
        state.user = ObjectVersions.from_snapshot(snapshot["user"])
        state.sessions = _objects_from_snapshot(snapshot["sessions"])
        state.emails = dict(snapshot["emails"])
        state.sms = dict(snapshot["sms"])
        state._stream = _Stream.from_snapshot(snapshot)
        return state


def has_versions(view: dict[str, Any]) -> bool:
    """Whether a user's or organization's view holds a version of the object itself (at an
    `as_of` before its first, it holds none; a user's sessions alone do not make one)."""
    return view["data"] is not None or bool(view["deleted"])


def activity_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """The device, browser and place a session's data reports, if it reports any."""
    activity = data.get("latest_activity")
    if not isinstance(activity, dict):
        return None
    return {key: activity.get(key) for key in ACTIVITY_FIELDS}


def latest_activity(versions: ObjectVersions) -> tuple[Version, dict[str, Any]] | None:
    """The session's last known activity, with the version that reported it: the newest in
    key order that has one. Clerk's `session.ended`, `.revoked` and `.removed` carry
    `latest_activity: null`, yet an ended session was last active from somewhere."""
    for version in reversed(versions.versions):
        activity = activity_of(version.data)
        if activity is not None:
            return version, activity
    return None


def session_view(session_id: str, versions: ObjectVersions) -> dict[str, Any]:
    data = versions.as_data() or {}
    status = data.get("status")
    actor = data.get("actor")
    found = latest_activity(versions)
    return {
        "id": session_id,
        "status": status,
        "created_at": data.get("created_at"),
        "ended_at": None
        if nonempty_str(status) in LIVE_SESSION_STATUSES
        else data.get("updated_at"),
        "last_active_at": data.get("last_active_at"),
        "latest_activity": found[1] if found else None,
        "actor": actor if isinstance(actor, dict) else None,
        "client_id": data.get("client_id"),
    }


class OrganizationState:
    """An organization with its memberships, invitations and domains."""

    def __init__(self, organization_id: str | None = None) -> None:
        self.organization_id = organization_id
        self.organization = ObjectVersions()
        self.memberships: dict[str, ObjectVersions] = {}
        self.invitations: dict[str, ObjectVersions] = {}
        self.domains: dict[str, ObjectVersions] = {}
        self._stream = _Stream()

    def _collection(self, object_type: str) -> dict[str, ObjectVersions] | None:
        return {
            "organization_membership": self.memberships,
            "organization_invitation": self.invitations,
            "organization_domain": self.domains,
        }.get(object_type)

    def apply(self, delivery: Delivery, seq: int) -> Folded:
        """Fold one delivery; `seq` is its arrival sequence (its position in the stream)."""
        object_id = delivery.subject_id
        object_type = object_type_of(delivery.type)
        actor = actor_of(delivery)
        if not self._stream.admit(delivery):
            return Folded(object_id, object_type, None, actor, duplicate=True)
        if self.organization_id is None:
            self.organization_id = organization_id_of(delivery.type, delivery.data)
        folded = folded_type_of(delivery.type)
        if not object_id or folded is None:
            return Folded(object_id, object_type, None, actor)
        if folded == "organization":
            versions: ObjectVersions | None = self.organization
        else:
            collection = self._collection(folded)
            versions = _versions_of(collection, object_id) if collection is not None else None
        placement = None
        if versions is not None:
            placement = self._stream.version(
                versions, delivery, seq, object_id, actor, in_history=True
            )
        return Folded(object_id, object_type, placement, actor)

    @property
    def deleted(self) -> bool:
        return self.organization.deleted

    def history_entries(self, object_id: str | None = None) -> list[HistoryEntry]:
        """Every object's versions, sorted by (occurred_at, event_id)."""
        return self._stream.entries(object_id)

    def view(self) -> dict[str, Any]:
        # As the API lists them: none current of an organization deleted.
        members = [
            membership_view(mid, versions)
            for mid, versions in self.memberships.items()
            if not versions.deleted and not self.organization.deleted
        ]
        invitations = [
            invitation_view(iid, versions)
            for iid, versions in self.invitations.items()
            if not versions.deleted and not self.organization.deleted
        ]
        domains = [domain_view(did, v) for did, v in self.domains.items()]
        return {
            "id": self.organization_id,
            "deleted": self.organization.deleted,
            "data": self.organization.as_data(),
            "members": sorted(members, key=created_sort_key),
            "invitations": sorted(invitations, key=created_sort_key),
            "domains": sorted(domains, key=created_sort_key),
            "first_seen_at": self._stream.first_seen_at,
            "last_event_at": self._stream.last_event_at,
        }

    def memberships_in_order(self) -> list[tuple[OrderKey, dict[str, Any]]]:
        """Each membership's view, removed ones included, with where its current version
        stands in SPEC 3's order: comparable across organizations, as one re-sent under another
        organization (never by Clerk) has versions in each one's stream."""
        return [
            (versions.current.key, membership_view(membership_id, versions))
            for membership_id, versions in self.memberships.items()
            if versions.current is not None
        ]

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "snapshot_version": SNAPSHOT_VERSION,
            "organization_id": self.organization_id,
            "organization": self.organization.to_snapshot(),
            "memberships": _objects_snapshot(self.memberships),
            "invitations": _objects_snapshot(self.invitations),
            "domains": _objects_snapshot(self.domains),
            **self._stream.to_snapshot(),
        }

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> OrganizationState:
        state = cls(snapshot["organization_id"])
        state.organization = ObjectVersions.from_snapshot(snapshot["organization"])
        state.memberships = _objects_from_snapshot(snapshot["memberships"])
        state.invitations = _objects_from_snapshot(snapshot["invitations"])
        state.domains = _objects_from_snapshot(snapshot["domains"])
        state._stream = _Stream.from_snapshot(snapshot)
        return state


def membership_view(membership_id: str, versions: ObjectVersions) -> dict[str, Any]:
    data = versions.as_data() or {}
    public_user_data = data.get("public_user_data")
    return {
        "id": membership_id,
        "user_id": (
            nonempty_str(public_user_data.get("user_id"))
            if isinstance(public_user_data, dict)
            else None
        ),
        "role": data.get("role"),
        "role_name": data.get("role_name"),
        "permissions": data.get("permissions"),
        "created_at": data.get("created_at"),
        "updated_at": data.get("updated_at"),
        "deleted": versions.deleted,
    }


def invitation_view(invitation_id: str, versions: ObjectVersions) -> dict[str, Any]:
    data = versions.as_data() or {}
    status = nonempty_str(data.get("status"))
    current = versions.current
    if status is None and current is not None:
        status = INVITATION_STATUS_BY_ACTION.get(current.type.rsplit(".", 1)[-1])
    return {
        "id": invitation_id,
        "email_address": data.get("email_address"),
        "role": data.get("role"),
        "status": status,
        "created_at": data.get("created_at"),
        "updated_at": data.get("updated_at"),
    }


def domain_view(domain_id: str, versions: ObjectVersions) -> dict[str, Any]:
    data = versions.as_data() or {}
    return {
        "id": domain_id,
        "name": data.get("name"),
        "enrollment_mode": data.get("enrollment_mode"),
        "verification": data.get("verification"),
        "created_at": data.get("created_at"),
        "updated_at": data.get("updated_at"),
        "deleted": versions.deleted,
    }


State = TypeVar("State", UserState, OrganizationState)


def _fold(state: State, deliveries: Iterable[tuple[Delivery, int]], as_of: int | None) -> State:
    for delivery, seq in deliveries:
        if as_of is not None and event_time(delivery) > as_of:
            continue
        state.apply(delivery, seq)
    return state


def fold_user(deliveries: Iterable[tuple[Delivery, int]], *, as_of: int | None = None) -> UserState:
    """A user's state from its stream, or as of an occurred_at when `as_of` is given."""
    return _fold(UserState(), deliveries, as_of)


def fold_organization(
    deliveries: Iterable[tuple[Delivery, int]], *, as_of: int | None = None
) -> OrganizationState:
    """An organization's state from its stream, or as of an occurred_at when `as_of` is given."""
    return _fold(OrganizationState(), deliveries, as_of)
