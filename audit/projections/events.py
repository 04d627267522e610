"""The event index: every stored delivery, known type or not, and every Clerk id it concerns."""

from __future__ import annotations

from audit.aggregates.actor import actor_of
from audit.aggregates.routing import related_ids
from audit.projections.base import Projection, StoredDelivery, Tables, to_json
from audit.storage import Cursor, Db


class EventIndex(Projection):
    name = "events"
    version = 1
    table_names = ("events", "event_subjects")

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
            " actor_ip TEXT,"
            " body TEXT NOT NULL)",
            f"CREATE INDEX {t.index('events_type')} ON {t['events']} (type, position)",
            f"CREATE INDEX {t.index('events_occurred')} ON {t['events']} (occurred_at, position)",
            f"CREATE TABLE {t['event_subjects']} ("
            " clerk_id TEXT NOT NULL,"
            " position BIGINT NOT NULL,"
            " PRIMARY KEY (clerk_id, position))",
        ]

    def handle(self, cursor: Cursor, t: Tables, db: Db, event: StoredDelivery) -> None:
        delivery = event.delivery
        actor = actor_of(delivery)
        cursor.execute(
            db.sql(
                f"INSERT INTO {t['events']} (position, svix_id, type, subject_id, subject_object,"
                " occurred_at, received_at, instance_id, actor, actor_ip, body)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            [
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
                delivery.body,
            ],
        )
        cursor.executemany(
            db.sql(f"INSERT INTO {t['event_subjects']} (clerk_id, position) VALUES (%s, %s)"),
            [[clerk_id, event.position] for clerk_id in related_ids(delivery.type, delivery.data)],
        )
