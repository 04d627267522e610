"""Current state of every Clerk object, and the field-level change history (who changed what).

Each versioned delivery is placed among its object's versions by the order rules of SPEC 3
(`audit.aggregates.versions`): its changes are taken against its predecessor in that order, and a
late arrival that lands before a recorded version recomputes that successor's changes. So the
tables depend on which deliveries were recorded, not on the order they arrived in (only `stale`,
a fact about arrival, does).
"""

from __future__ import annotations

from typing import Any

from audit.aggregates.actor import actor_of
from audit.aggregates.changes import Change
from audit.aggregates.routing import organization_id_of
from audit.aggregates.state import (
    domain_view,
    invitation_view,
    membership_view,
    object_type_of,
    session_view,
)
from audit.aggregates.versions import ObjectVersions, Version, place
from audit.projections.base import Projection, StoredDelivery, Tables, from_json, to_json
from audit.storage import Cursor, Db
from audit.timeparse import epoch_ms

# A deletion sorts after every version of its object; SQL keys need a finite stand-in for inf.
DELETION_KEY = 2**62

# Event family -> the current-state table its objects live in.
TABLE_OF_FAMILY = {
    "user": "users",
    "session": "sessions",
    "organization": "organizations",
    "organizationMembership": "memberships",
    "organizationInvitation": "invitations",
    "organizationDomain": "domains",
}
USER_FAMILIES = ("user", "session")

_VERSION_COLUMNS = "event_id, type, k1, k2, k3, occurred_at, deletion, data"


def _profile_view(object_id: str, versions: ObjectVersions) -> dict[str, Any]:
    return {"id": object_id, "deleted": versions.deleted, "data": versions.as_data()}


VIEW_OF_TABLE = {
    "users": _profile_view,
    "organizations": _profile_view,
    "sessions": session_view,
    "memberships": membership_view,
    "invitations": invitation_view,
    "domains": domain_view,
}


class ObjectsProjection(Projection):
    name = "objects"
    version = 1
    table_names = ("versions", "history", "changes", *VIEW_OF_TABLE)

    def schema(self, t: Tables, db: Db) -> list[str]:
        statements = [
            f"CREATE TABLE {t['versions']} ("
            " object_id TEXT NOT NULL, k1 BIGINT NOT NULL, k2 BIGINT NOT NULL, k3 BIGINT NOT NULL,"
            " event_id TEXT NOT NULL, type TEXT NOT NULL, occurred_at BIGINT,"
            " deletion INTEGER NOT NULL, data TEXT NOT NULL,"
            " PRIMARY KEY (object_id, k1, k2, k3))",
            f"CREATE TABLE {t['history']} ("
            " position BIGINT NOT NULL, object_id TEXT NOT NULL, object_type TEXT NOT NULL,"
            " owner_id TEXT NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL,"
            " occurred_at BIGINT, received_at BIGINT NOT NULL, actor TEXT NOT NULL,"
            " stale INTEGER NOT NULL, changes TEXT NOT NULL,"
            " PRIMARY KEY (position, object_id))",
            f"CREATE INDEX {t.index('history_owner')} ON {t['history']} (owner_id, position)",
            f"CREATE INDEX {t.index('history_object')} ON {t['history']} (object_id, position)",
            f"CREATE TABLE {t['changes']} ("
            " position BIGINT NOT NULL, object_id TEXT NOT NULL, field TEXT NOT NULL,"
            " from_value TEXT, to_value TEXT, object_type TEXT NOT NULL, owner_id TEXT NOT NULL,"
            " event_id TEXT NOT NULL, type TEXT NOT NULL, occurred_at BIGINT,"
            " received_at BIGINT NOT NULL, actor TEXT NOT NULL, actor_ip TEXT,"
            " stale INTEGER NOT NULL,"
            " PRIMARY KEY (position, object_id, field))",
            f"CREATE INDEX {t.index('changes_field')} ON {t['changes']} (field, position)",
            f"CREATE INDEX {t.index('changes_object')} ON {t['changes']} (object_id, position)",
            f"CREATE INDEX {t.index('changes_owner')} ON {t['changes']} (owner_id, position)",
            f"CREATE INDEX {t.index('changes_ip')} ON {t['changes']} (actor_ip, position)",
            f"CREATE INDEX {t.index('changes_type')} ON {t['changes']} (type, position)",
            f"CREATE INDEX {t.index('changes_occurred')} ON {t['changes']} (occurred_at, position)",
        ]
        for table in VIEW_OF_TABLE:
            statements += [
                f"CREATE TABLE {t[table]} ("
                " id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, user_id TEXT,"
                " organization_id TEXT, status TEXT, deleted INTEGER NOT NULL,"
                " created_at BIGINT, updated_at BIGINT, position BIGINT NOT NULL,"
                " view TEXT NOT NULL)",
                f"CREATE INDEX {t.index(table + '_owner')} ON {t[table]}"
                " (owner_id, created_at, id)",
                f"CREATE INDEX {t.index(table + '_user')} ON {t[table]} (user_id, created_at, id)",
            ]
        return statements

    def handle(self, cursor: Cursor, t: Tables, db: Db, event: StoredDelivery) -> None:
        delivery = event.delivery
        family = delivery.type.split(".", 1)[0]
        table = TABLE_OF_FAMILY.get(family)
        object_id = delivery.subject_id
        if table is None or object_id is None:
            return  # not a versioned object (email, sms, roles, billing, unknown types)
        owner_id = self._owner_of(cursor, t, db, family, delivery.data, object_id)
        if owner_id is None:
            owner_id = object_id  # a stub seen first: adopted when a version names the owner
        elif owner_id != object_id:
            self._adopt_orphans(cursor, t, db, table, object_id, owner_id)
        new = Version.of(delivery, event.position)
        predecessor, successor = self._neighbours(cursor, t, db, object_id, new)
        placement = place(new, predecessor, successor)
        self._insert_version(cursor, t, db, object_id, new)

        actor = actor_of(delivery)
        row = {
            "position": event.position,
            "object_id": object_id,
            "object_type": object_type_of(delivery.type),
            "owner_id": owner_id,
            "event_id": delivery.svix_id,
            "type": delivery.type,
            "occurred_at": delivery.occurred_at,
            "received_at": delivery.received_at,
            "actor": to_json(actor),
            "actor_ip": actor["ip"],
            "stale": int(placement.stale),
        }
        self._write_history(cursor, t, db, row, placement.changes)
        if successor is not None and placement.successor_changes is not None:
            self._rewrite_successor(
                cursor, t, db, object_id, successor, placement.successor_changes
            )
        if placement.becomes_current:
            versions = ObjectVersions([v for v in (predecessor, new) if v is not None])
            self._write_current(cursor, t, db, table, object_id, owner_id, versions, event.position)
        elif successor is not None and successor.deletion:
            # A late version just before the deletion: the deleted object's last known data.
            versions = ObjectVersions([new, successor])
            self._write_current(cursor, t, db, table, object_id, owner_id, versions, event.position)

    # -- pieces ------------------------------------------------------------------------------

    @staticmethod
    def _owner_of(
        cursor: Cursor, t: Tables, db: Db, family: str, data: dict[str, Any], object_id: str
    ) -> str | None:
        if family == "user":
            return object_id
        if family == "session":
            user_id = data.get("user_id")
            return user_id if isinstance(user_id, str) else None
        if family == "organization":
            return object_id
        owner = organization_id_of(f"{family}.x", data)
        if owner is None:  # a deletion stub: the organization its earlier versions named
            cursor.execute(
                db.sql(f"SELECT owner_id FROM {t[TABLE_OF_FAMILY[family]]} WHERE id = %s"),
                [object_id],
            )
            found = cursor.fetchone()
            owner = found["owner_id"] if found else None
        return owner

    @staticmethod
    def _adopt_orphans(
        cursor: Cursor, t: Tables, db: Db, table: str, object_id: str, owner_id: str
    ) -> None:
        """Rows written from a stub that arrived before any version naming its owner."""
        for logical in ("history", "changes"):
            cursor.execute(
                db.sql(
                    f"UPDATE {t[logical]} SET owner_id = %s WHERE object_id = %s AND owner_id = %s"
                ),
                [owner_id, object_id, object_id],
            )
        cursor.execute(
            db.sql(
                f"UPDATE {t[table]} SET owner_id = %s, organization_id = %s"
                " WHERE id = %s AND owner_id = %s"
            ),
            [owner_id, owner_id, object_id, object_id],
        )

    @staticmethod
    def _key(version: Version) -> tuple[int, int, int]:
        first = DELETION_KEY if version.deletion else int(version.key[0])
        return first, version.key[1], version.key[2]

    def _neighbours(
        self, cursor: Cursor, t: Tables, db: Db, object_id: str, new: Version
    ) -> tuple[Version | None, Version | None]:
        key = self._key(new)
        sides = [
            f"SELECT * FROM (SELECT '{side}' AS side, {_VERSION_COLUMNS} FROM {t['versions']}"
            f" WHERE object_id = %s AND (k1, k2, k3) {comparison} (%s, %s, %s)"
            f" ORDER BY k1 {order}, k2 {order}, k3 {order} LIMIT 1) AS {side}"
            for side, comparison, order in (("before", "<", "DESC"), ("after", ">", "ASC"))
        ]
        cursor.execute(db.sql(" UNION ALL ".join(sides)), [object_id, *key, object_id, *key])
        found = {row["side"]: _version_from_row(row) for row in cursor.fetchall()}
        return found.get("before"), found.get("after")

    def _insert_version(
        self, cursor: Cursor, t: Tables, db: Db, object_id: str, version: Version
    ) -> None:
        cursor.execute(
            db.sql(
                f"INSERT INTO {t['versions']} (object_id, {_VERSION_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            [
                object_id,
                version.event_id,
                version.type,
                *self._key(version),
                version.occurred_at,
                int(version.deletion),
                to_json(version.data),
            ],
        )

    @staticmethod
    def _write_history(
        cursor: Cursor, t: Tables, db: Db, row: dict[str, Any], changes: list[Change]
    ) -> None:
        cursor.execute(
            db.sql(
                f"INSERT INTO {t['history']} (position, object_id, object_type, owner_id,"
                " event_id, type, occurred_at, received_at, actor, stale, changes)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            [
                row["position"],
                row["object_id"],
                row["object_type"],
                row["owner_id"],
                row["event_id"],
                row["type"],
                row["occurred_at"],
                row["received_at"],
                row["actor"],
                row["stale"],
                to_json(changes),
            ],
        )
        if not changes:
            return
        cursor.executemany(
            db.sql(
                f"INSERT INTO {t['changes']} (position, object_id, field, from_value, to_value,"
                " object_type, owner_id, event_id, type, occurred_at, received_at, actor,"
                " actor_ip, stale) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            [
                [
                    row["position"],
                    row["object_id"],
                    change["field"],
                    to_json(change["from"]),
                    to_json(change["to"]),
                    row["object_type"],
                    row["owner_id"],
                    row["event_id"],
                    row["type"],
                    row["occurred_at"],
                    row["received_at"],
                    row["actor"],
                    row["actor_ip"],
                    row["stale"],
                ]
                for change in changes
            ],
        )

    def _rewrite_successor(
        self,
        cursor: Cursor,
        t: Tables,
        db: Db,
        object_id: str,
        successor: Version,
        changes: list[Change],
    ) -> None:
        """The successor now follows the new version: its changes are taken against it."""
        position = successor.key[2]
        cursor.execute(
            db.sql(
                f"SELECT position, object_id, object_type, owner_id, event_id, type, occurred_at,"
                f" received_at, actor, stale FROM {t['history']}"
                " WHERE position = %s AND object_id = %s"
            ),
            [position, object_id],
        )
        found = cursor.fetchone()
        if found is None:
            return
        row = {key: found[key] for key in found.keys()}  # noqa: SIM118 (sqlite3.Row)
        row["actor_ip"] = (from_json(row["actor"]) or {}).get("ip")
        for statement in (
            f"DELETE FROM {t['changes']} WHERE position = %s AND object_id = %s",
            f"DELETE FROM {t['history']} WHERE position = %s AND object_id = %s",
        ):
            cursor.execute(db.sql(statement), [position, object_id])
        self._write_history(cursor, t, db, row, changes)

    @staticmethod
    def _write_current(
        cursor: Cursor,
        t: Tables,
        db: Db,
        table: str,
        object_id: str,
        owner_id: str,
        versions: ObjectVersions,
        position: int,
    ) -> None:
        view = VIEW_OF_TABLE[table](object_id, versions)
        data = versions.as_data() or {}
        organization_id = owner_id if table in ("memberships", "invitations", "domains") else None
        if table == "organizations":
            organization_id = object_id
        user_id = view.get("user_id") if table == "memberships" else None
        if table in ("users", "sessions"):
            user_id = owner_id
        values = [
            object_id,
            owner_id,
            user_id,
            organization_id,
            view.get("status"),
            int(versions.deleted),
            epoch_ms(data.get("created_at")),
            epoch_ms(data.get("updated_at")),
            position,
            to_json(view),
        ]
        cursor.execute(
            db.sql(
                f"INSERT INTO {t[table]} (id, owner_id, user_id, organization_id, status, deleted,"
                " created_at, updated_at, position, view)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET owner_id = excluded.owner_id,"
                " user_id = excluded.user_id, organization_id = excluded.organization_id,"
                " status = excluded.status, deleted = excluded.deleted,"
                " created_at = excluded.created_at, updated_at = excluded.updated_at,"
                " position = excluded.position, view = excluded.view"
            ),
            values,
        )


def _version_from_row(row: Any) -> Version:
    first = float("inf") if row["k1"] == DELETION_KEY else float(row["k1"])
    return Version(
        event_id=row["event_id"],
        type=row["type"],
        key=(first, row["k2"], row["k3"]),
        data=from_json(row["data"]),
        deletion=bool(row["deletion"]),
        occurred_at=row["occurred_at"],
    )
