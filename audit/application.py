"""The audit log application: records verified deliveries, and rebuilds aggregates from the store.

Recording never folds an aggregate: a delivery is appended at the next version of its stream, with
a delivery marker in the same transaction, so the webhook path costs the same for a user with ten
events as for one with ten thousand. Batches of concurrent deliveries are written in one
transaction (see `audit.intake`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, project_aggregate
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import (
    IntegrityError,
    JSONTranscoder,
    MapperDeserialisationError,
    StoredEvent,
)

from audit.aggregates.delivery import Delivery
from audit.aggregates.routing import (
    SUB_OBJECTS_WITH_STUBS,
    StreamKind,
    StreamRef,
    delivery_marker_id,
    needs_owner_lookup,
    organization_id_of,
    owning_stream,
    related_ids,
    stream_id,
)
from audit.aggregates.state import (
    OrganizationState,
    OutdatedSnapshot,
    UserState,
    fold_organization,
    fold_user,
)
from audit.aggregates.streams import (
    DeliveryMarker,
    RecordedDelivery,
    marker_event,
    recorded_event,
)
from audit.config import Database, SqliteDatabase
from audit.storage import (
    APPLICATION_NAME,
    AppendsFirst,
    Db,
    StoreUnavailable,
    dialect_of,
    eventsourcing_env,
    owner_index_holds,
    prepare_database,
    setup_lock,
)
from audit.transcoding import StateAsJson, StoreTranscoder

# How many deliveries stored past a read model's position a 404 reads through for the id asked
# about: on a busy store a few are nearly always pending, and reading a thousand takes some tens
# of milliseconds. More are pending only during a version's build or after an outage: then it
# cannot tell.
PENDING_LOOKED_THROUGH = 1000

# How often one delivery is retried after losing an optimistic-concurrency race on its stream.
MAX_STREAM_CONFLICT_RETRIES = 20
VERSION_CACHE_SIZE = 50_000
# A read that folds at least this many events after the latest snapshot takes a new one.
SNAPSHOT_EVERY = 200


@dataclass(frozen=True)
class Recorded:
    event_id: str
    position: int
    status: str = "recorded"


@dataclass(frozen=True)
class Duplicate:
    event_id: str
    position: int
    status: str = "duplicate"


@dataclass(frozen=True)
class Conflict:
    """The svix-id is recorded already, with a different body."""

    event_id: str
    status: str = "conflict"


Outcome = Recorded | Duplicate | Conflict


class AuditLog(Application[UUID]):
    """Appends Clerk deliveries to the event store and folds User and Organization aggregates."""

    name = APPLICATION_NAME
    is_snapshotting_enabled = True

    def __init__(self, database: Database) -> None:
        prepare_database(database)
        with setup_lock(database):
            super().__init__(env=eventsourcing_env(database))
            dialect = dialect_of(database)
            self.database = database
            self.db = Db(
                self.recorder.datastore,  # type: ignore[attr-defined]
                dialect,
                getattr(database, "schema", ""),
                AppendsFirst(database) if isinstance(database, SqliteDatabase) else None,
            )
            self.db.protect_events_table()
        self._versions: OrderedDict[UUID, int] = OrderedDict()
        self._versions_lock = threading.Lock()

    def close(self) -> None:
        self.db.close()
        super().close()

    def construct_transcoder(self) -> StoreTranscoder:
        transcoder = StoreTranscoder()
        self.register_transcodings(transcoder)
        return transcoder

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        # The names are stored in snapshots: keep them.
        transcoder.register(StateAsJson(UserState, "clerk_audit_user_state"))
        transcoder.register(StateAsJson(OrganizationState, "clerk_audit_organization_state"))

    # -- recording -------------------------------------------------------------------------

    def record(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Record each delivery once; answer for each, in order.

        Raises StoreUnavailable when the database cannot take the write: then nothing of the
        batch is written, and a retry (Svix's) will succeed later.
        """
        with self.db.guarded(), self.db.appending():
            return self._record_batch(deliveries)

    def _record_batch(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        first_of: dict[str, Delivery] = {}
        for delivery in deliveries:
            first_of.setdefault(delivery.svix_id, delivery)
        refs, versions = self._look_up(list(first_of.values()))
        outcomes: dict[str, Outcome] = {}
        fresh: list[Delivery] = []
        for svix_id, delivery in first_of.items():
            if versions[delivery_marker_id(svix_id)]:
                outcomes[svix_id] = self._outcome_of_existing(delivery)
            else:
                fresh.append(delivery)
        if fresh:
            try:
                outcomes.update(self._append(fresh, refs, versions))
            except IntegrityError:
                # A race with another connection or process: settle each one on its own.
                self._forget_versions(refs[delivery.svix_id] for delivery in fresh)
                for delivery in fresh:
                    outcomes[delivery.svix_id] = self._record_one(delivery)
        return [
            self._answer(delivery, first_of[delivery.svix_id], outcomes[delivery.svix_id])
            for delivery in deliveries
        ]

    def _answer(self, delivery: Delivery, first: Delivery, outcome: Outcome) -> Outcome:
        """The answer to one copy, given what happened to the first copy of its svix-id."""
        if delivery is first:
            return outcome
        if delivery.sha256 == first.sha256:
            if isinstance(outcome, Recorded):
                return Duplicate(outcome.event_id, outcome.position)
            return outcome
        if isinstance(outcome, Conflict):
            # The first copy differed from the body recorded before; this one may be that body.
            return self._outcome_of_existing(delivery)
        return Conflict(delivery.svix_id)

    def _record_one(self, delivery: Delivery) -> Outcome:
        for _ in range(MAX_STREAM_CONFLICT_RETRIES):
            refs, versions = self._look_up([delivery])
            if versions[delivery_marker_id(delivery.svix_id)]:
                return self._outcome_of_existing(delivery)
            try:
                return self._append([delivery], refs, versions)[delivery.svix_id]
            except IntegrityError:
                self._forget_versions(refs.values())
        raise StoreUnavailable("the stream kept changing under this delivery; retry later")

    def _look_up(
        self, deliveries: Sequence[Delivery]
    ) -> tuple[dict[str, StreamRef], dict[UUID, int]]:
        """Where each delivery goes, and in one query the last version of each stream involved:
        its owning stream's, and its delivery marker's (1 when the svix-id is recorded already).
        """
        named = _owners_named(deliveries)
        refs = {delivery.svix_id: self._stream_of(delivery, named) for delivery in deliveries}
        streams = {ref.stream_id for ref in refs.values()}
        streams |= {delivery_marker_id(delivery.svix_id) for delivery in deliveries}
        return refs, self._last_versions(streams)

    def _append(
        self,
        deliveries: Sequence[Delivery],
        refs: dict[str, StreamRef],
        versions: dict[UUID, int],
    ) -> dict[str, Outcome]:
        """Append fresh deliveries and their markers in one transaction, which also notes the
        owner of each sub-object they name (for a later deletion stub that names none)."""
        next_version = {ref.stream_id: versions[ref.stream_id] + 1 for ref in refs.values()}
        events: list[Any] = []
        placed: list[tuple[Delivery, UUID, int]] = []
        for delivery in deliveries:
            ref = refs[delivery.svix_id]
            stream = ref.stream_id
            version = next_version[stream]
            next_version[stream] = version + 1
            events.append(recorded_event(ref.kind, stream, version, delivery))
            events.append(
                marker_event(delivery_marker_id(delivery.svix_id), delivery, stream, version)
            )
            placed.append((delivery, stream, version))
        # Straight to the event store: these are events, not aggregates, so save()'s collecting
        # (a runtime protocol check per event) and snapshotting have nothing to do.
        recordings = self.events.put(events, owners=_owners_named(deliveries))
        position_of = {
            (r.domain_event.originator_id, r.domain_event.originator_version): r.notification.id
            for r in recordings
        }
        with self._versions_lock:
            for stream, version in next_version.items():
                self._versions[stream] = version - 1
                self._versions.move_to_end(stream)
            while len(self._versions) > VERSION_CACHE_SIZE:
                self._versions.popitem(last=False)
        return {
            delivery.svix_id: Recorded(delivery.svix_id, position_of[(stream, version)])
            for delivery, stream, version in placed
        }

    def _stream_of(self, delivery: Delivery, named: dict[str, str]) -> StreamRef:
        """`named`: the owners the same batch names, which the owner index does not hold yet."""
        known_owner = None
        if needs_owner_lookup(delivery.type, delivery.data) and delivery.subject_id:
            # The organization a stub names no owner for, from another delivery of that object.
            known_owner = named.get(delivery.subject_id) or self.db.owner_of(delivery.subject_id)
        return owning_stream(delivery.type, delivery.data, delivery.svix_id, known_owner)

    def _last_versions(self, streams: set[UUID]) -> dict[UUID, int]:
        """The last stored version of each stream (0 for a new one): cached, else one query."""
        with self._versions_lock:
            known = {s: self._versions[s] for s in streams if s in self._versions}
        unknown = [s for s in streams if s not in known]
        if unknown:
            found = self.db.last_versions(unknown)
            known.update({stream: found.get(stream, 0) for stream in unknown})
        return known

    def _forget_versions(self, refs: Iterable[StreamRef]) -> None:
        with self._versions_lock:
            for ref in refs:
                self._versions.pop(ref.stream_id, None)

    def _outcome_of_existing(self, delivery: Delivery) -> Outcome:
        marker: DeliveryMarker = self.repository.get(delivery_marker_id(delivery.svix_id))
        if marker.sha256 != delivery.sha256:
            return Conflict(delivery.svix_id)
        position = self.db.position_of(marker.stream_id, marker.stream_version)
        assert position is not None, "a marker is written in the same transaction as its event"
        return Duplicate(delivery.svix_id, position)

    # -- reading ---------------------------------------------------------------------------

    def stored_event(self, row: Mapping[str, Any]) -> Any:
        """The event a row of the events table holds (its `topic`, `originator_id`,
        `originator_version` and `state`), through the application's mapper (upcasting)."""
        return self.mapper.to_domain_event(
            StoredEvent(
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
        )

    def stored_delivery(self, row: Mapping[str, Any]) -> Delivery:
        """The delivery a row of the events table holds (`stored_event`)."""
        event = self.stored_event(row)
        assert isinstance(event, RecordedDelivery)
        return event.delivery()

    def stream_events(self, stream: UUID) -> list[RecordedDelivery]:
        with self.db.guarded():
            return list(self.events.get(stream))  # type: ignore[arg-type]

    def pending_deliveries_concern(self, after: int, clerk_id: str) -> bool:
        """Whether a delivery stored after position `after` concerns `clerk_id`, as the events
        read model will index it (`related_ids`). True, unread, when more than
        PENDING_LOOKED_THROUGH are pending."""
        db = self.db
        column = db.position_column
        rows = db.fetchall(
            "SELECT originator_id, originator_version, topic, state"
            f" FROM {db.table(db.events_table)} WHERE {column} > %s AND topic <> %s"
            f" ORDER BY {column} LIMIT %s",
            [after, DeliveryMarker.Created.TOPIC, PENDING_LOOKED_THROUGH + 1],
            payloads=True,
        )
        if len(rows) > PENDING_LOOKED_THROUGH:
            return True
        deliveries = map(self.stored_delivery, rows)
        return any(clerk_id in related_ids(d.type, d.data) for d in deliveries)

    def last_position(self, kind: StreamKind, clerk_id: str) -> int | None:
        """Where the latest event of a user's or an organization's stream is in the store; None
        if nothing was ever recorded for it."""
        return self.db.last_position(stream_id(kind, clerk_id))

    def user_state(self, user_id: str, *, as_of: int | None = None) -> UserState:
        state = self._state("user", user_id, as_of)
        assert isinstance(state, UserState)
        return state

    def organization_state(self, org_id: str, *, as_of: int | None = None) -> OrganizationState:
        state = self._state("organization", org_id, as_of)
        assert isinstance(state, OrganizationState)
        return state

    def _state(
        self, kind: StreamKind, clerk_id: str, as_of: int | None
    ) -> UserState | OrganizationState:
        """The aggregate now (snapshot and the events after it) or as of a time (its stream
        folded up to then), with the stubs of its sub-objects that sit in streams of their own
        (`_fold_with_stubs`)."""
        stream = stream_id(kind, clerk_id)
        state: UserState | OrganizationState
        if as_of is None:
            state = self._current(stream).state
            events = None
        else:
            events = self.stream_events(stream)
            if not events:
                raise AggregateNotFoundError(clerk_id)
            deliveries = ((e.delivery(), e.originator_version) for e in events)
            state = _FOLDS[kind](deliveries, as_of=as_of)
        if isinstance(state, UserState):
            owned = set(state.sessions)
        else:
            owned = {*state.memberships, *state.invitations, *state.domains}
        stubs = self._stub_streams(owned)
        if not stubs:
            return state
        return self._fold_with_stubs(kind, stream, events, stubs, as_of)

    def _stub_streams(self, object_ids: set[str]) -> list[UUID]:
        """The streams of sub-objects' deliveries recorded without their owner (a session's
        event without its `user_id`; a membership's, invitation's or domain's stub without its
        organization, unless the owner index knew it): each sub-object's own, where it has one
        (`owning_stream`)."""
        if not object_ids:
            return []
        streams = [stream_id("subject", object_id) for object_id in sorted(object_ids)]
        return list(self.db.last_versions(streams))

    def _fold_with_stubs(
        self,
        kind: StreamKind,
        stream: UUID,
        events: list[RecordedDelivery] | None,
        stubs: list[UUID],
        as_of: int | None,
    ) -> UserState | OrganizationState:
        """The aggregate folded with what its sub-objects' own streams hold, in store order.
        Without them, `show` and `as_of` said a domain or a membership deleted by a stub still
        existed, and a session ended before its user was named still active, while the read
        models, which adopt such stubs, said otherwise."""
        if events is None:
            events = self.stream_events(stream)
        merged = [*events, *(event for stub in stubs for event in self.stream_events(stub))]
        positions = self.db.positions([stream, *stubs])
        merged.sort(key=lambda e: positions[(e.originator_id, e.originator_version)])
        return _FOLDS[kind](
            ((e.delivery(), positions[(e.originator_id, e.originator_version)]) for e in merged),
            as_of=as_of,
        )

    def _current(self, stream: UUID) -> Any:
        """The aggregate now: its latest snapshot plus the events after it.

        A read that had to fold SNAPSHOT_EVERY or more events leaves a snapshot behind. (`as_of`
        reads fold the whole stream: a snapshot at a stream version may already hold events
        that occurred after the requested time, since delivery order is not event order.)
        """
        with self.db.guarded():
            try:
                aggregate = self.repository.get(stream)
            except MapperDeserialisationError as exc:
                if not isinstance(exc.__cause__, OutdatedSnapshot):
                    raise
                # Taken by a release that folded otherwise: the stream is folded whole.
                aggregate = project_aggregate(None, self.repository.event_store.get(stream))
            assert self.snapshots is not None
            # The latest snapshot's version, not the snapshot: decoding it again cost as much.
            latest = self.snapshots.recorder.select_events(stream, desc=True, limit=1)
            snapshot_version = latest[0].originator_version if latest else 0
            if aggregate.version - snapshot_version >= SNAPSHOT_EVERY:
                self.snapshots.put([Snapshot.take(aggregate)])
        return aggregate


def _owners_named(deliveries: Iterable[Delivery]) -> dict[str, str]:
    """The organization each sub-object whose deletion stub names none is said to belong to
    (only ids the owner index holds)."""
    return {
        delivery.subject_id: organization
        for delivery in deliveries
        if delivery.type.startswith(SUB_OBJECTS_WITH_STUBS)
        and delivery.subject_id
        and (organization := organization_id_of(delivery.type, delivery.data))
        and owner_index_holds(delivery.subject_id, organization)
    }


_FOLDS: dict[str, Any] = {"user": fold_user, "organization": fold_organization}
