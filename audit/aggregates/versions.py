"""The order of one Clerk object's versions (SPEC 3, "Order"), shared by aggregates and projections.

Delivery order is not event order, so every recorded version of an object is placed by its key:
the object's own `updated_at`, then the envelope time, then the arrival sequence. A deletion is
final and always sorts last. Placing a version needs only its neighbours in key order, which is
all a SQL projection can cheaply fetch; the final state and every version's changes then depend
only on the set of versions recorded, never on the order they arrived in. Only `stale` does.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from audit.aggregates.changes import Change, diff
from audit.aggregates.delivery import Delivery
from audit.timeparse import epoch_ms

OrderKey = tuple[float, int, int]


def is_deletion(delivery: Delivery) -> bool:
    """`*.deleted`, or a payload flagged deleted. Ended sessions and revoked invitations are not."""
    return delivery.type.endswith(".deleted") or delivery.data.get("deleted") is True


def order_key(delivery: Delivery, seq: int, *, deletion: bool) -> OrderKey:
    """Where a version sorts among its object's versions; `seq` is the arrival sequence."""
    occurred_at = delivery.occurred_at or 0
    if deletion:
        first: float = math.inf
    else:
        updated_at = epoch_ms(delivery.data.get("updated_at"))
        first = updated_at if updated_at is not None else occurred_at
    return (first, occurred_at, seq)


def versioned_data(delivery: Delivery) -> dict[str, Any]:
    """The part of a payload that is the object's own state.

    A session payload embeds a full copy of its user (two thirds of its bytes): that is the
    user's state, versioned with the user, not the session's. The stored event keeps it.
    """
    if delivery.type.startswith("session.") and "user" in delivery.data:
        return {key: value for key, value in delivery.data.items() if key != "user"}
    return delivery.data


@dataclass(frozen=True)
class Version:
    """One recorded version of one object."""

    event_id: str
    type: str
    key: OrderKey
    data: dict[str, Any] = field(compare=False, repr=False)
    deletion: bool = False
    occurred_at: int | None = None

    @classmethod
    def of(cls, delivery: Delivery, seq: int) -> Version:
        deletion = is_deletion(delivery)
        return cls(
            event_id=delivery.svix_id,
            type=delivery.type,
            key=order_key(delivery, seq, deletion=deletion),
            data=versioned_data(delivery),
            deletion=deletion,
            occurred_at=delivery.occurred_at,
        )

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "key": [_encode_float(self.key[0]), self.key[1], self.key[2]],
            "data": self.data,
            "deletion": self.deletion,
            "occurred_at": self.occurred_at,
        }

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> Version:
        first, occurred_at, seq = snapshot["key"]
        return cls(
            event_id=snapshot["event_id"],
            type=snapshot["type"],
            key=(_decode_float(first), occurred_at, seq),
            data=snapshot["data"],
            deletion=snapshot["deletion"],
            occurred_at=snapshot["occurred_at"],
        )


def _encode_float(value: float) -> float | str:
    """JSON has no infinity: a deletion's key is stored as the string "inf"."""
    return "inf" if value == math.inf else value


def _decode_float(value: float | str) -> float:
    return math.inf if value == "inf" else value


@dataclass(frozen=True)
class Placement:
    """What recording one version did to its object's history.

    `changes` is the new version against its predecessor in key order. When the new version lands
    before an existing one, that successor now follows it instead of the old predecessor, so its
    changes are recomputed: `successor_changes` (and `successor_id`, which version they belong to).
    `successor_changes` is None when there is no successor, or when its changes cannot differ: a
    deletion's one change, `deleted`, is the same whatever precedes it, unless that is a deletion.
    """

    stale: bool
    changes: list[Change]
    successor_changes: list[Change] | None
    becomes_current: bool
    successor_id: str | None = None
    # A deletion beside another (before or after it): the deleted object's state is unchanged.
    repeats_deletion: bool = False


DELETED_CHANGE_FIELD = "deleted"


def changes_between(predecessor: Version | None, version: Version) -> list[Change]:
    """The changes of `version` given what precedes it in key order."""
    if predecessor is not None and predecessor.deletion:
        return []  # only a second deletion can follow a deletion: it changes nothing
    if version.deletion:
        return [{"field": DELETED_CHANGE_FIELD, "from": None, "to": True}]
    return diff(predecessor.data if predecessor is not None else None, version.data)


def place(new: Version, predecessor: Version | None, successor: Version | None) -> Placement:
    """Place `new` between its neighbours in key order (either may be None)."""
    second_deletion = new.deletion and predecessor is not None and predecessor.deletion
    retaken = successor is not None and not (successor.deletion and not new.deletion)
    return Placement(
        stale=successor is not None or second_deletion,
        changes=changes_between(predecessor, new),
        successor_changes=changes_between(new, successor) if retaken else None,
        becomes_current=successor is None,
        successor_id=successor.event_id if successor is not None else None,
        # A deletion sorts after every other version, so its successor can only be one.
        repeats_deletion=second_deletion or (new.deletion and successor is not None),
    )


class ObjectVersions:
    """Every recorded version of one object, kept in key order."""

    def __init__(self, versions: list[Version] | None = None) -> None:
        self._versions: list[Version] = sorted(versions or [], key=lambda v: v.key)
        self._keys: list[OrderKey] = [version.key for version in self._versions]

    def __len__(self) -> int:
        return len(self._versions)

    @property
    def versions(self) -> list[Version]:
        return list(self._versions)

    def add(self, version: Version) -> Placement:
        index = bisect.bisect_right(self._keys, version.key)
        predecessor = self._versions[index - 1] if index > 0 else None
        successor = self._versions[index] if index < len(self._versions) else None
        placement = place(version, predecessor, successor)
        self._versions.insert(index, version)
        self._keys.insert(index, version.key)
        return placement

    @property
    def current(self) -> Version | None:
        return self._versions[-1] if self._versions else None

    @property
    def deleted(self) -> bool:
        current = self.current
        return current is not None and current.deletion

    @property
    def latest_data(self) -> dict[str, Any] | None:
        """The newest non-deletion data: deletion stubs carry too little to describe the object."""
        for version in reversed(self._versions):
            if not version.deletion:
                return version.data
        return None

    def as_data(self) -> dict[str, Any] | None:
        """The object as it now is; a deleted object keeps its last data, flagged deleted."""
        current = self.current
        if current is None:
            return None
        data = self.latest_data
        if data is None:
            data = self._versions[0].data  # only deletions were recorded: the stub is all we know
        if current.deletion:
            return {**data, "deleted": True}
        return dict(data)

    def to_snapshot(self) -> dict[str, Any]:
        return {"versions": [version.to_snapshot() for version in self._versions]}

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> ObjectVersions:
        return cls([Version.from_snapshot(item) for item in snapshot["versions"]])
