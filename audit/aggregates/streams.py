"""The stored event classes and the aggregates whose streams hold them.

Every delivery is stored once, as a `Recorded` (or, first in its stream, `Created`) event of the
aggregate that owns it: User, Organization, or Subject for anything else. A one-event
DeliveryMarker stream per svix-id is written in the same transaction, so a redelivery clashes on
the store's primary key: duplicate detection is atomic across connections and processes.

Topics are pinned: they are stored with every event, and must survive renames and moves.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.domain import Aggregate, AggregateCreated, AggregateEvent

from audit.aggregates.delivery import Delivery, delivery_from_record
from audit.aggregates.routing import StreamKind
from audit.aggregates.state import OrganizationState, UserState


class RecordedDelivery(AggregateEvent):
    """A verified Clerk delivery, verbatim, with its receipt metadata.

    Version 1 stored no SHA-256 of the body; the upcast computes it, so old events still load.
    Version 2 kept no signature header: those events have none.
    """

    class_version: ClassVar[int] = 3

    svix_id: str
    svix_timestamp: int
    type: str
    occurred_at: int | None
    instance_id: str | None
    event_attributes: dict[str, Any] | None
    received_at: int
    body: str
    sha256: str
    signature: str | None

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["sha256"] = hashlib.sha256(state["body"].encode("utf-8")).hexdigest()

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["signature"] = None

    def delivery(self) -> Delivery:
        return delivery_from_record(self.__dict__)

    def apply(self, aggregate: Any) -> None:
        aggregate.fold(self.delivery(), self.originator_version)


def delivery_fields(delivery: Delivery) -> dict[str, Any]:
    return {
        "svix_id": delivery.svix_id,
        "svix_timestamp": delivery.svix_timestamp,
        "type": delivery.type,
        "occurred_at": delivery.occurred_at,
        "instance_id": delivery.instance_id,
        "event_attributes": delivery.event_attributes,
        "received_at": delivery.received_at,
        "body": delivery.body,
        "sha256": delivery.sha256,
        "signature": delivery.signature,
    }


class User(Aggregate):
    """A Clerk user with its sessions, e-mails and SMS, folded from its stream."""

    TOPIC = "clerk-audit:User"

    class Event(Aggregate.Event):
        pass

    class Created(AggregateCreated, RecordedDelivery):
        TOPIC = "clerk-audit:User.Created"

        def apply(self, aggregate: Any) -> None:
            aggregate.state = UserState()
            RecordedDelivery.apply(self, aggregate)

    class Recorded(RecordedDelivery):
        TOPIC = "clerk-audit:User.Recorded"

    # `state` (a UserState) is set by Created.apply: a class-level annotation would make
    # eventsourcing expect it as a constructor argument.

    def fold(self, delivery: Delivery, seq: int) -> None:
        self.state.apply(delivery, seq)


class Organization(Aggregate):
    """A Clerk organization with its memberships, invitations and domains."""

    TOPIC = "clerk-audit:Organization"

    class Event(Aggregate.Event):
        pass

    class Created(AggregateCreated, RecordedDelivery):
        TOPIC = "clerk-audit:Organization.Created"

        def apply(self, aggregate: Any) -> None:
            aggregate.state = OrganizationState()
            RecordedDelivery.apply(self, aggregate)

    class Recorded(RecordedDelivery):
        TOPIC = "clerk-audit:Organization.Recorded"

    # `state` (an OrganizationState) is set by Created.apply.

    def fold(self, delivery: Delivery, seq: int) -> None:
        self.state.apply(delivery, seq)


class Subject(Aggregate):
    """Any other Clerk object (role, permission, billing, types not known yet): kept, not folded."""

    TOPIC = "clerk-audit:Subject"

    class Event(Aggregate.Event):
        pass

    class Created(AggregateCreated, RecordedDelivery):
        TOPIC = "clerk-audit:Subject.Created"

        def apply(self, aggregate: Any) -> None:
            aggregate.types = []
            RecordedDelivery.apply(self, aggregate)

    class Recorded(RecordedDelivery):
        TOPIC = "clerk-audit:Subject.Recorded"

    # `types` (the event types recorded about the subject) is set by Created.apply.

    def fold(self, delivery: Delivery, seq: int) -> None:
        self.types.append(delivery.type)


class DeliveryMarker(Aggregate):
    """Says that a svix-id is recorded, where, and with which body digest."""

    TOPIC = "clerk-audit:DeliveryMarker"

    class Event(Aggregate.Event):
        pass

    class Created(AggregateCreated):
        TOPIC = "clerk-audit:DeliveryMarker.Created"

        svix_id: str
        stream_id: UUID
        stream_version: int
        sha256: str

        def apply(self, aggregate: Any) -> None:
            aggregate.svix_id = self.svix_id
            aggregate.stream_id = self.stream_id
            aggregate.stream_version = self.stream_version
            aggregate.sha256 = self.sha256

    svix_id: str
    stream_id: UUID
    stream_version: int
    sha256: str


STREAM_CLASSES: dict[StreamKind, type[User] | type[Organization] | type[Subject]] = {
    "user": User,
    "organization": Organization,
    "subject": Subject,
}


def recorded_event(
    kind: StreamKind, stream: UUID, version: int, delivery: Delivery
) -> RecordedDelivery:
    """The event that appends `delivery` at `version` of a stream (version 1 creates it)."""
    aggregate_class = STREAM_CLASSES[kind]
    timestamp = datetime.fromtimestamp(delivery.received_at / 1000, tz=UTC)
    fields = delivery_fields(delivery)
    if version == 1:
        return aggregate_class.Created(
            originator_id=stream,
            originator_version=1,
            timestamp=timestamp,
            originator_topic=aggregate_class.TOPIC,
            **fields,
        )
    return aggregate_class.Recorded(
        originator_id=stream, originator_version=version, timestamp=timestamp, **fields
    )


def marker_event(marker: UUID, delivery: Delivery, stream: UUID, version: int) -> AggregateEvent:
    timestamp = datetime.fromtimestamp(delivery.received_at / 1000, tz=UTC)
    return DeliveryMarker.Created(
        originator_id=marker,
        originator_version=1,
        timestamp=timestamp,
        originator_topic=DeliveryMarker.TOPIC,
        svix_id=delivery.svix_id,
        stream_id=stream,
        stream_version=version,
        sha256=delivery.sha256,
    )
