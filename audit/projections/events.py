"""The event index: every stored delivery, known type or not, and every Clerk id it concerns.

The payload itself is not copied here: reads take it from the event store, by position (version
1 kept a copy of each body, which was three quarters of the index's bytes and half of its
server time in a rebuild).
"""

from __future__ import annotations

from collections.abc import Sequence

from audit.aggregates.actor import actor_of
from audit.aggregates.routing import related_ids
from audit.projections.base import (
    Projection,
    StoredDelivery,
    Tables,
    mark_times,
    time_marks_index,
    time_marks_schema,
    to_json,
)
from audit.storage import Cursor, Db

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


class EventIndex(Projection):
    name = "events"
    version = 3
    time_marks_from = 3
    rebuild_seconds = 125.8
    table_names = ("events", "event_subjects", "time_marks")

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
        db.insert_rows(cursor, t["events"], EVENT_COLUMNS, indexed)
        db.insert_rows(cursor, t["event_subjects"], SUBJECT_COLUMNS, subjects)
