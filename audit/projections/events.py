"""The event index: every stored delivery, known type or not, and every Clerk id it concerns.

The payload itself is not copied here: reads take it from the event store, by position (version
1 kept a copy of each body, which was three quarters of the index's bytes and half of its
server time in a rebuild).

A deletion stub of an organization's domain names no organization, yet concerns it: version 4
notes each domain's organization as its events name it, so the stub is found by the
organization's id as well (`_StubOwners`).
"""

from __future__ import annotations

from collections.abc import Sequence

from audit.aggregates.actor import actor_of
from audit.aggregates.delivery import Delivery
from audit.aggregates.routing import (
    SUB_OBJECTS_WITH_STUBS,
    organization_id_of,
    related_ids,
)
from audit.projections.base import (
    Projection,
    StoredDelivery,
    Tables,
    mark_times,
    time_marks_index,
    time_marks_schema,
    to_json,
)
from audit.storage import Cursor, Db, owner_index_holds

EVENT_COLUMNS = (
    ("position", "bigint"),
    ("svix_id", "text"),
    ("type", "text"),
    ("subject_id", "text"),
    ("subject_object", "text"),
    ("occurred_at", "bigint"),
    ("received_at", "bigint"),
    ("instance_id", "text"),
    ("actor", "text"),
    ("actor_ip", "text"),
)
SUBJECT_COLUMNS = (("clerk_id", "text"), ("position", "bigint"))
OWNER_COLUMNS = (("object_id", "text"), ("organization_id", "text"))
ORPHAN_COLUMNS = (("object_id", "text"), ("position", "bigint"))


class EventIndex(Projection):
    name = "events"
    # 5: billing events concern their payer (its user or organization), subscription and plan;
    # 6: and the payment and subscription items they name
    version = 6
    time_marks_from = 3
    rebuild_seconds = 125.8
    table_names = ("events", "event_subjects", "time_marks", "owners", "orphan_stubs")

    def schema(self, t: Tables, db: Db) -> list[str]:
        return [
            f"CREATE TABLE {t['events']} ("
            " position BIGINT PRIMARY KEY,"
            " svix_id TEXT NOT NULL UNIQUE,"
            " type TEXT NOT NULL,"
            " subject_id TEXT,"
            " subject_object TEXT,"
            " occurred_at BIGINT,"
            " received_at BIGINT NOT NULL,"
            " instance_id TEXT,"
            " actor TEXT NOT NULL,"
            " actor_ip TEXT)",
            # No key: about nine rows per delivery, in no order of clerk_id. A build indexes
            # them once, sorted, when it goes live (an index update per row was most of the
            # projection's server time).
            f"CREATE TABLE {t['event_subjects']} ("
            " clerk_id TEXT NOT NULL,"
            " position BIGINT NOT NULL)",
            time_marks_schema(t),
            f"CREATE TABLE {t['owners']} ("
            " object_id TEXT PRIMARY KEY, organization_id TEXT NOT NULL)",
            f"CREATE TABLE {t['orphan_stubs']} ("
            " object_id TEXT NOT NULL, position BIGINT NOT NULL,"
            " PRIMARY KEY (object_id, position))",
        ]

    def read_indexes(self, t: Tables) -> list[str]:
        return [
            f"CREATE INDEX IF NOT EXISTS {t.index('event_subjects_id')}"
            f" ON {t['event_subjects']} (clerk_id, position)",
            f"CREATE INDEX IF NOT EXISTS {t.index('events_type')}"
            f" ON {t['events']} (type, position)",
            f"CREATE INDEX IF NOT EXISTS {t.index('events_occurred')}"
            f" ON {t['events']} (occurred_at, position)",
            time_marks_index(t),
        ]

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        mark_times(cursor, t, db, events)
        owners = _StubOwners(cursor, t, db, events)
        indexed = []
        subjects = []
        for event in events:
            delivery = event.delivery
            actor = actor_of(delivery)
            indexed.append(
                (
                    event.position,
                    delivery.svix_id,
                    delivery.type,
                    delivery.subject_id,
                    delivery.subject_object,
                    delivery.occurred_at,
                    delivery.received_at,
                    delivery.instance_id,
                    to_json(actor),
                    actor["ip"],
                )
            )
            subjects += [
                (clerk_id, event.position) for clerk_id in related_ids(delivery.type, delivery.data)
            ]
            subjects += owners.subjects(delivery, event.position)
        db.insert_rows(cursor, t["events"], EVENT_COLUMNS, indexed)
        db.insert_rows(cursor, t["event_subjects"], SUBJECT_COLUMNS, subjects)
        owners.flush()


class _StubOwners:
    """The organization of each domain, as its events name it, for the stubs that name none.

    A stub seen before any event naming its organization waits (`orphan_stubs`) until one
    does: then it gets its subject row. So the rows depend on which events were stored, not
    on the order they came in, like every read model's. Ids with a NUL are left out, as from
    the store's owner index: PostgreSQL text would hold another id in their place.
    """

    def __init__(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        self.cursor, self.t, self.db = cursor, t, db
        self.named: dict[str, str] = {}  # named in this batch, to be noted
        self.orphans: dict[str, list[int]] = {}  # stubs of this batch still waiting
        self.adopted: list[str] = []  # objects whose noted stubs this batch's events adopt
        # The noted stubs of the objects this batch names, in one query (it finds none nearly
        # always; a query per naming event was a twentieth of the index's time in a rebuild).
        self.noted: dict[str, list[int]] = {}
        naming = {
            found[0]
            for e in events
            if (found := _sub_object_and_organization(e.delivery)) and found[1] is not None
        }
        if naming:
            condition, params = db.any_of(sorted(naming))
            cursor.execute(
                db.sql(
                    f"SELECT object_id, position FROM {t['orphan_stubs']}"
                    f" WHERE object_id {condition}"
                ),
                params,
            )
            for row in cursor.fetchall():
                self.noted.setdefault(row["object_id"], []).append(row["position"])

    def subjects(self, delivery: Delivery, position: int) -> list[tuple[str, int]]:
        """The subject rows the event's own ids do not give: a stub's organization, or, for
        the stubs waiting for it, the organization this event names."""
        found = _sub_object_and_organization(delivery)
        if found is None:
            return []
        object_id, organization_id = found
        if organization_id is None:  # a stub
            owner = self.named.get(object_id) or self._noted_owner(object_id)
            if owner is None:
                self.orphans.setdefault(object_id, []).append(position)
                return []
            return [(owner, position)]
        self.named[object_id] = organization_id
        noted = self.noted.pop(object_id, [])
        if noted:
            self.adopted.append(object_id)
        waiting = self.orphans.pop(object_id, []) + noted
        return [(organization_id, stub) for stub in waiting]

    def _noted_owner(self, object_id: str) -> str | None:
        self.cursor.execute(
            self.db.sql(f"SELECT organization_id FROM {self.t['owners']} WHERE object_id = %s"),
            [object_id],
        )
        found = self.cursor.fetchone()
        return found["organization_id"] if found else None

    def flush(self) -> None:
        self.db.insert_rows(
            self.cursor,
            self.t["owners"],
            OWNER_COLUMNS,
            list(self.named.items()),
            on_conflict="ON CONFLICT (object_id) DO UPDATE"
            " SET organization_id = excluded.organization_id",
        )
        orphans = [(i, p) for i, positions in self.orphans.items() for p in positions]
        self.db.insert_rows(self.cursor, self.t["orphan_stubs"], ORPHAN_COLUMNS, orphans)
        if self.adopted:
            condition, params = self.db.any_of(self.adopted)
            self.cursor.execute(
                self.db.sql(f"DELETE FROM {self.t['orphan_stubs']} WHERE object_id {condition}"),
                params,
            )


def _sub_object_and_organization(delivery: Delivery) -> tuple[str, str | None] | None:
    """For an event of a sub-object whose deletion stub names no organization: its id, and the
    organization the event names (None: a stub). None for any other event, and for ids with a
    NUL, which PostgreSQL text would hold as another id."""
    object_id = delivery.subject_id
    if (
        object_id is None
        or not delivery.type.startswith(SUB_OBJECTS_WITH_STUBS)
        or not owner_index_holds(object_id)
    ):
        return None
    return object_id, organization_id_of(delivery.type, delivery.data)
