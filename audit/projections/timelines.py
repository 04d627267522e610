"""Per-session timelines: every session event, ordered by when it occurred.

A delivery whose envelope has no `timestamp` has no `occurred_at` (null, as `/v1/events` shows
it): it is placed by its receipt time instead (`ordered_at`), and no time filter selects it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from audit.aggregates.actor import actor_of
from audit.aggregates.state import ACTIVITY_FIELDS, FOLDED_TYPES
from audit.projections.base import Projection, StoredDelivery, Tables, to_json
from audit.storage import Cursor, Db

SESSION_TYPES = frozenset(name for name in FOLDED_TYPES if name.startswith("session."))
COLUMNS = (
    ("session_id", "text"),
    ("ordered_at", "bigint"),
    ("occurred_at", "bigint"),
    ("position", "bigint"),
    ("user_id", "text"),
    ("event_id", "text"),
    ("type", "text"),
    ("status", "text"),
    ("actor", "text"),
    ("activity", "text"),
)


class SessionTimelines(Projection):
    name = "timelines"
    # 2: `occurred_at` null without an envelope timestamp (v1 showed the receipt time as it);
    # 3: only the session types the aggregates fold (a `session.*` type Clerk adds later may be
    # about another kind of object)
    version = 3
    rebuild_seconds = 23.2
    table_names = ("session_events",)

    def schema(self, t: Tables, db: Db) -> list[str]:
        return [
            f"CREATE TABLE {t['session_events']} ("
            " session_id TEXT NOT NULL, ordered_at BIGINT NOT NULL, occurred_at BIGINT,"
            " position BIGINT NOT NULL, user_id TEXT, event_id TEXT NOT NULL, type TEXT NOT NULL,"
            " status TEXT, actor TEXT NOT NULL, activity TEXT,"
            " PRIMARY KEY (session_id, ordered_at, position))",
        ]

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        rows = [row for event in events if (row := _timeline_row(event)) is not None]
        db.insert_rows(cursor, t["session_events"], COLUMNS, rows)


def _timeline_row(event: StoredDelivery) -> tuple[Any, ...] | None:
    delivery = event.delivery
    if delivery.type not in SESSION_TYPES or delivery.subject_id is None:
        return None
    data = delivery.data
    activity = data.get("latest_activity")
    actor = dict(actor_of(delivery))
    impersonation = data.get("actor")
    actor["session_actor"] = impersonation if isinstance(impersonation, dict) else None
    return (
        delivery.subject_id,
        delivery.occurred_at if delivery.occurred_at is not None else delivery.received_at,
        delivery.occurred_at,
        event.position,
        data.get("user_id") if isinstance(data.get("user_id"), str) else None,
        delivery.svix_id,
        delivery.type,
        data.get("status") if isinstance(data.get("status"), str) else None,
        to_json(actor),
        to_json({k: activity.get(k) for k in ACTIVITY_FIELDS})
        if isinstance(activity, dict)
        else None,
    )
