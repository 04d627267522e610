"""Current state of every Clerk object, and the field-level change history (who changed what).

Each versioned delivery is placed among its object's versions by the order rules of SPEC 3
(`audit.aggregates.versions`): its changes are taken against its predecessor in that order, and a
late arrival that lands before a recorded version recomputes that successor's changes. So the
tables depend on which deliveries were recorded, not on the order they arrived in (only `stale`,
a fact about arrival, does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from audit.addresses import address_key
from audit.aggregates.actor import actor_of
from audit.aggregates.changes import Change
from audit.aggregates.routing import organization_id_of
from audit.aggregates.state import (
    FOLDED_TYPES,
    activity_of,
    domain_view,
    invitation_view,
    latest_activity,
    membership_view,
    object_type_of,
    session_view,
)
from audit.aggregates.versions import ObjectVersions, Version, place
from audit.projections.base import (
    Projection,
    StoredDelivery,
    Tables,
    from_json,
    mark_times,
    time_marks_index,
    time_marks_schema,
    to_json,
)
from audit.redaction import redact_recorded_changes
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
    # The instance's roles and their permissions: who changed what a role may do is an audit's
    # question too. Neither belongs to a user or an organization.
    "role": "roles",
    "permission": "permissions",
}
# In a session's stored view: when the version its `latest_activity` came from sorts.
ACTIVITY_KEY = "latest_activity_key"

SELF_OWNED = ("user", "organization", "role", "permission")

# The collation of what is found by a range of its index: byte order. In it the change paths
# under `a.b` are exactly those from `a.b.` up to `a.b/` (`/` follows `.`), and a network's
# address keys are one range (`audit.addresses`). A database's own collation may not be
# (en_US ignores punctuation at first). SQLite's default is byte order.
BYTE_ORDER = {"postgresql": ' COLLATE "C"', "sqlite": ""}
# The first version whose paths are in that order.
FIELD_ORDER_FROM = 14
# The first version whose history rows keep their actor's address key (`actor_ip_key`).
ADDRESS_KEYS_FROM = 16

_VERSION_FIELDS = "event_id, type, k1, k2, k3, occurred_at, deletion, data"
VERSION_COLUMNS = (
    ("object_id", "text"),
    ("event_id", "text"),
    ("type", "text"),
    ("k1", "bigint"),
    ("k2", "bigint"),
    ("k3", "bigint"),
    ("occurred_at", "bigint"),
    ("deletion", "int4"),
    ("data", "text"),
)
HISTORY_COLUMNS = (
    ("position", "bigint"),
    ("object_id", "text"),
    ("object_type", "text"),
    ("owner_id", "text"),
    ("event_id", "text"),
    ("type", "text"),
    ("occurred_at", "bigint"),
    ("received_at", "bigint"),
    ("actor", "text"),
    ("actor_ip", "text"),
    ("actor_ip_key", "text"),
    ("stale", "int4"),
)
# A history row's changes are its `changes` rows, read by key (version 2 also kept them in the
# history row as JSON: a second copy, 85% of the row's bytes).
_HISTORY_FIELD_NAMES = [name for name, _ in HISTORY_COLUMNS]
_HISTORY_FIELDS = ", ".join(_HISTORY_FIELD_NAMES)
# A change row is only what changed. What changes are filtered by besides the field (the owner,
# the type, the time, the actor's IP) is its event's, in the event's history row, and is indexed
# there: a version has ten or so change rows, so indexing those facts on each (version 3) made
# five of the seven B-trees over the largest table.
CHANGE_COLUMNS = (
    ("position", "bigint"),
    ("object_id", "text"),
    ("field", "text"),
    ("from_value", "text"),
    ("to_value", "text"),
)
CURRENT_COLUMNS = (
    ("id", "text"),
    ("owner_id", "text"),
    ("user_id", "text"),
    ("organization_id", "text"),
    ("status", "text"),
    ("deleted", "int4"),
    ("created_at", "bigint"),
    ("updated_at", "bigint"),
    ("position", "bigint"),
    ("listed_at", "bigint"),
    ("view", "text"),
)


def upsert(db: Db, table: str) -> str:
    """A current row replaces the stored one. It keeps its `listed_at` (the position that put
    it in its owner's and its user's lists, which are walked in that order) unless it moved to
    another owner or user: a list then gains it at the position that moved it."""
    same = "IS NOT DISTINCT FROM" if db.dialect == "postgresql" else "IS"
    return (
        "ON CONFLICT (id) DO UPDATE SET owner_id = excluded.owner_id,"
        " user_id = excluded.user_id, organization_id = excluded.organization_id,"
        " status = excluded.status, deleted = excluded.deleted,"
        " created_at = excluded.created_at, updated_at = excluded.updated_at,"
        f" position = excluded.position, listed_at = CASE WHEN {table}.owner_id ="
        f" excluded.owner_id AND {table}.user_id {same} excluded.user_id"
        f" THEN {table}.listed_at ELSE excluded.listed_at END, view = excluded.view"
    )


def _profile_view(object_id: str, versions: ObjectVersions) -> dict[str, Any]:
    return {"id": object_id, "deleted": versions.deleted, "data": versions.as_data()}


VIEW_OF_TABLE = {
    "users": _profile_view,
    "organizations": _profile_view,
    "sessions": session_view,
    "memberships": membership_view,
    "invitations": invitation_view,
    "domains": domain_view,
    "roles": _profile_view,
    "permissions": _profile_view,
}


class ObjectsProjection(Projection):
    name = "objects"
    # 11: current rows keep the position that listed them (`listed_at`); 12: roles, permissions;
    # 13: changes hide what the snapshots' own `object` members make secret; 14: change paths
    # compare byte by byte on PostgreSQL too (BYTE_ORDER), so the paths under one are a range;
    # 15: only the types the aggregates fold are versioned (FOLDED_TYPES), not all of a family's;
    # 16: history rows keep their actor's address key, so `actor_ip=` takes networks, and a
    # NUL in a change path is written `\0` (`audit.aggregates.changes`)
    version = 16
    time_marks_from = 5
    rebuild_seconds = 233.5
    table_names = ("versions", "history", "changes", "time_marks", *VIEW_OF_TABLE)

    def schema(self, t: Tables, db: Db) -> list[str]:
        # The indexes here are the ones `apply` itself reads by (a batch's latest versions and
        # orphans, adopting them); the others are `read_indexes`.
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
            f" actor_ip TEXT, actor_ip_key TEXT{BYTE_ORDER[db.dialect]}, stale INTEGER NOT NULL,"
            # An event versions one object, its subject, so its position is the row's key.
            # (Joined by position alone, a planner also estimates the join's size right: by
            # position and object, it took the two as independent and the join as tiny.)
            " PRIMARY KEY (position))",
            f"CREATE INDEX {t.index('history_object')} ON {t['history']} (object_id, position)",
            f"CREATE TABLE {t['changes']} ("
            " position BIGINT NOT NULL, object_id TEXT NOT NULL,"
            f" field TEXT{BYTE_ORDER[db.dialect]} NOT NULL,"
            " from_value TEXT, to_value TEXT,"
            " PRIMARY KEY (position, object_id, field))",
            time_marks_schema(t),
        ]
        for table in VIEW_OF_TABLE:
            statements += [
                f"CREATE TABLE {t[table]} ("
                " id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, user_id TEXT,"
                " organization_id TEXT, status TEXT, deleted INTEGER NOT NULL,"
                " created_at BIGINT, updated_at BIGINT, position BIGINT NOT NULL,"
                " listed_at BIGINT NOT NULL, view TEXT NOT NULL)",
            ]
        return statements

    def read_indexes(self, t: Tables) -> list[str]:
        # History rows by each filter, in position order: the order of their changes' keys.
        statements = [
            f"CREATE INDEX IF NOT EXISTS {t.index(f'history_{name}')}"
            f" ON {t['history']} ({column}, position)"
            for name, column in (
                ("owner", "owner_id"),
                ("type", "type"),
                ("ip", "actor_ip_key"),
                ("occurred", "occurred_at"),
            )
        ]
        statements += [
            f"CREATE INDEX IF NOT EXISTS {t.index('changes_field')}"
            f" ON {t['changes']} (field, position)",
            time_marks_index(t),
        ]
        for table in VIEW_OF_TABLE:
            statements += [
                f"CREATE INDEX IF NOT EXISTS {t.index(f'{table}_{column}')}"
                f" ON {t[table]} ({column}_id, listed_at, id)"
                for column in ("owner", "user")
            ]
        return statements

    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        mark_times(cursor, t, db, events)
        versioned = []
        for event in events:
            family = event.delivery.type.split(".", 1)[0]
            table = TABLE_OF_FAMILY.get(family)
            # Not versioned objects: email, sms, billing, unknown types (of these families too).
            if (
                table is not None
                and event.delivery.subject_id is not None
                and event.delivery.type in FOLDED_TYPES
            ):
                versioned.append((event, family, table, event.delivery.subject_id))
        if not versioned:
            return
        batch = _Batch(cursor, t, db)
        batch.load(
            {object_id for _, _, _, object_id in versioned},
            {object_id for _, family, _, object_id in versioned if family not in SELF_OWNED},
            {
                object_id
                for event, family, _, object_id in versioned
                if family == "session" and activity_of(event.delivery.data) is None
            },
        )
        for event, family, table, object_id in versioned:
            self._apply_one(batch, event, family, table, object_id)
        batch.flush()

    def _apply_one(
        self, batch: _Batch, event: StoredDelivery, family: str, table: str, object_id: str
    ) -> None:
        delivery = event.delivery
        owner_id = self._owner_of(batch, family, table, delivery.data, object_id)
        if owner_id is None:
            owner_id = object_id  # a stub seen first: adopted when a version names the owner
            batch.orphans.add(object_id)
        elif owner_id != object_id and object_id in batch.orphans:
            self._adopt_orphans(batch, table, object_id, owner_id, event.position)
        new = Version.of(delivery, event.position)
        latest = batch.latest.get(object_id)
        if latest is None or _key(new) > _key(latest):
            predecessor, successor = latest, None  # the common case: newer than all recorded
            batch.latest[object_id] = new
        else:
            predecessor, successor = self._neighbours(batch, object_id, new)
        placement = place(new, predecessor, successor)
        batch.add_version(object_id, new)

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
            "actor_ip_key": address_key(actor["ip"]),
            "stale": int(placement.stale),
        }
        before = predecessor.data if predecessor is not None else None
        batch.add_history(row, redact_recorded_changes(before, new.data, placement.changes))
        if successor is not None and placement.successor_changes is not None:
            changes = redact_recorded_changes(new.data, successor.data, placement.successor_changes)
            self._rewrite_successor(batch, object_id, successor, changes)
        if placement.repeats_deletion:
            pass  # the deleted object's row keeps its last known data
        elif placement.becomes_current:
            versions = ObjectVersions([v for v in (predecessor, new) if v is not None])
            batch.set_current(table, object_id, owner_id, versions, event.position)
        elif successor is not None and successor.deletion:
            # A late version just before the deletion: the deleted object's last known data.
            versions = ObjectVersions([new, successor])
            batch.set_current(table, object_id, owner_id, versions, event.position)
        elif table == "sessions":
            batch.raise_activity(object_id, new)  # a late version may be the last activity

    # -- the uncommon cases, which read what the batch has written so far -------------------

    @staticmethod
    def _owner_of(
        batch: _Batch, family: str, table: str, data: dict[str, Any], object_id: str
    ) -> str | None:
        if family in SELF_OWNED:
            return object_id
        if family == "session":
            user_id = data.get("user_id")
            return user_id if isinstance(user_id, str) else None
        owner = organization_id_of(f"{family}.x", data)
        if owner is None:  # a deletion stub: the organization its earlier versions named
            owner = batch.current_owner(table, object_id)
        return owner

    @staticmethod
    def _adopt_orphans(
        batch: _Batch, table: str, object_id: str, owner_id: str, position: int
    ) -> None:
        """Rows written from a stub that arrived before any version naming its owner. The
        current row joins the owner's lists now, at `position` (see `upsert`)."""
        cursor, t, db = batch.settle(object_id)
        cursor.execute(
            db.sql(
                f"UPDATE {t['history']} SET owner_id = %s WHERE object_id = %s AND owner_id = %s"
            ),
            [owner_id, object_id, object_id],
        )
        # A session's owner is its user; the others' their organization (as `set_current`).
        column = "user_id" if table == "sessions" else "organization_id"
        cursor.execute(
            db.sql(
                f"UPDATE {t[table]} SET owner_id = %s, {column} = %s, listed_at = %s"
                " WHERE id = %s AND owner_id = %s"
            ),
            [owner_id, owner_id, position, object_id, object_id],
        )
        batch.orphans.discard(object_id)
        batch.session_rows.pop(object_id, None)  # its owner has changed: read it again

    @staticmethod
    def _neighbours(
        batch: _Batch, object_id: str, new: Version
    ) -> tuple[Version | None, Version | None]:
        """A late arrival: the recorded versions just before and just after it."""
        cursor, t, db = batch.settle(object_id)
        key = _key(new)
        sides = [
            f"SELECT * FROM (SELECT '{side}' AS side, {_VERSION_FIELDS} FROM {t['versions']}"
            f" WHERE object_id = %s AND (k1, k2, k3) {comparison} (%s, %s, %s)"
            f" ORDER BY k1 {order}, k2 {order}, k3 {order} LIMIT 1) AS {side}"
            for side, comparison, order in (("before", "<", "DESC"), ("after", ">", "ASC"))
        ]
        cursor.execute(db.sql(" UNION ALL ".join(sides)), [object_id, *key, object_id, *key])
        found = {row["side"]: _version_from_row(row) for row in cursor.fetchall()}
        return found.get("before"), found.get("after")

    @staticmethod
    def _rewrite_successor(
        batch: _Batch, object_id: str, successor: Version, changes: list[Change]
    ) -> None:
        """The successor now follows the new version: its changes are taken against it.

        No flush: the successor's rows are stored (`_neighbours`, which found it, flushed the
        object's gathered rows; since then only the new version's were gathered)."""
        cursor, t, db = batch.cursor, batch.t, batch.db
        position = successor.key[2]
        cursor.execute(
            db.sql(
                f"SELECT {_HISTORY_FIELDS} FROM {t['history']}"
                " WHERE position = %s AND object_id = %s"
            ),
            [position, object_id],
        )
        found = cursor.fetchone()
        if found is None:
            return
        row = {key: found[key] for key in found.keys()}  # noqa: SIM118 (sqlite3.Row)
        for statement in (
            f"DELETE FROM {t['changes']} WHERE position = %s AND object_id = %s",
            f"DELETE FROM {t['history']} WHERE position = %s AND object_id = %s",
        ):
            cursor.execute(db.sql(statement), [position, object_id])
        batch.add_history(row, changes)


class _Batch:
    """One batch's writes, gathered to be sent together, and what it knows of its objects.

    `load` reads, in one query, the latest recorded version of every object in the batch, so a
    version newer than all of them (nearly every one) is placed without a query of its own.
    Anything that reads or changes an object's stored rows (a late arrival's neighbours, adopted
    orphans) first flushes what has been gathered, if any of it is that object's (`settle`).
    """

    def __init__(self, cursor: Cursor, t: Tables, db: Db) -> None:
        self.cursor, self.t, self.db = cursor, t, db
        self.latest: dict[str, Version | None] = {}
        self.orphans: set[str] = set()  # objects with rows written under their own id as owner
        # Stored session rows `load` read (and rows `flush` has sent since), for their activity.
        self.session_rows: dict[str, tuple[Any, ...]] = {}
        self.versions: list[tuple[Any, ...]] = []
        self.history: list[tuple[Any, ...]] = []
        self.changes: list[tuple[Any, ...]] = []
        self.current: dict[str, dict[str, tuple[Any, ...]]] = {table: {} for table in VIEW_OF_TABLE}
        self.gathered_objects: set[str] = set()  # whose rows are among those gathered

    def load(self, object_ids: set[str], owned_ids: set[str], quiet_sessions: set[str]) -> None:
        """The latest version of each object, which of the owned ones are orphans, and the
        stored rows of the sessions whose version in the batch reports no activity."""
        cursor, t, db = self.cursor, self.t, self.db
        self.latest = dict.fromkeys(object_ids)
        newest_first = "ORDER BY k1 DESC, k2 DESC, k3 DESC LIMIT 1"
        if db.dialect == "postgresql":
            cursor.execute(
                f"SELECT o.id AS object_id, {_VERSION_FIELDS} FROM unnest(%s::text[]) AS o(id)"
                f" CROSS JOIN LATERAL (SELECT {_VERSION_FIELDS} FROM {t['versions']}"
                f" WHERE object_id = o.id {newest_first}) AS v",
                [sorted(object_ids)],
            )
            rows = list(cursor.fetchall())
        else:  # in-process: a query per object costs microseconds
            rows = []
            for object_id in object_ids:
                cursor.execute(
                    f"SELECT object_id, {_VERSION_FIELDS} FROM {t['versions']}"
                    f" WHERE object_id = ? {newest_first}",
                    [object_id],
                )
                rows += cursor.fetchall()
        for row in rows:
            self.latest[row["object_id"]] = _version_from_row(row)
        if owned_ids:
            condition, params = db.any_of(sorted(owned_ids))
            cursor.execute(
                db.sql(
                    f"SELECT DISTINCT object_id FROM {t['history']}"
                    f" WHERE object_id {condition} AND owner_id = object_id"
                ),
                params,
            )
            self.orphans = {row["object_id"] for row in cursor.fetchall()}
        if quiet_sessions:
            self._read_session_rows(sorted(quiet_sessions))

    def _read_session_rows(self, ids: list[str]) -> None:
        names = ", ".join(name for name, _ in CURRENT_COLUMNS)
        condition, params = self.db.any_of(ids)
        self.cursor.execute(
            self.db.sql(f"SELECT {names} FROM {self.t['sessions']} WHERE id {condition}"), params
        )
        for row in self.cursor.fetchall():
            self.session_rows[row["id"]] = tuple(row[name] for name, _ in CURRENT_COLUMNS)

    def add_version(self, object_id: str, version: Version) -> None:
        self.gathered_objects.add(object_id)
        self.versions.append(
            (
                object_id,
                version.event_id,
                version.type,
                *_key(version),
                version.occurred_at,
                int(version.deletion),
                to_json(version.data),
            )
        )

    def add_history(self, row: dict[str, Any], changes: list[Change]) -> None:
        self.gathered_objects.add(row["object_id"])
        self.history.append(tuple(row[name] for name in _HISTORY_FIELD_NAMES))
        position, object_id = row["position"], row["object_id"]
        self.changes += [
            (position, object_id, change["field"], to_json(change["from"]), to_json(change["to"]))
            for change in changes
        ]

    def set_current(
        self, table: str, object_id: str, owner_id: str, versions: ObjectVersions, position: int
    ) -> None:
        view = VIEW_OF_TABLE[table](object_id, versions)
        if table == "sessions":
            self._carry_activity(object_id, view, versions)
        data = versions.as_data() or {}
        organization_id = owner_id if table in ("memberships", "invitations", "domains") else None
        if table == "organizations":
            organization_id = object_id
        user_id = view.get("user_id") if table == "memberships" else None
        if table in ("users", "sessions"):
            user_id = owner_id
        gathered = self.current[table].get(object_id)
        if gathered is not None and gathered[1:3] != (owner_id, user_id):
            # A move within the batch: its row is stored first, so that `upsert` sees the move
            # (a move and back within one batch kept the first listing; in two, it did not).
            self.flush()
            gathered = None
        self.gathered_objects.add(object_id)
        # As `upsert` keeps it, so batches do not change it.
        listed_at = position if gathered is None else gathered[-2]
        self.current[table][object_id] = (
            object_id,
            owner_id,
            user_id,
            organization_id,
            _text(view.get("status")),  # the view keeps whatever the payload said
            int(versions.deleted),
            epoch_ms(data.get("created_at")),
            epoch_ms(data.get("updated_at")),
            position,
            listed_at,
            to_json(view),
        )

    # A session's last activity is that of its newest version that reports one (Clerk's
    # ended, revoked and removed sessions report none). `versions` here are the new current one
    # and the one before it at most, so the row keeps, with the activity, the key of the version
    # it came from: older ones are found there, and a late version compares with it.
    def _carry_activity(
        self, object_id: str, view: dict[str, Any], versions: ObjectVersions
    ) -> None:
        view[ACTIVITY_KEY] = None
        found = latest_activity(versions)
        if found is not None:
            view[ACTIVITY_KEY] = _activity_key(found[0])
            return
        row = self._session_row(object_id) if len(versions) > 1 else None
        if row is not None:
            stored = from_json(row[-1])
            view["latest_activity"] = stored.get("latest_activity")
            view[ACTIVITY_KEY] = stored.get(ACTIVITY_KEY)

    def raise_activity(self, object_id: str, late: Version) -> None:
        """A late version of a session: its activity is the last one if no newer version's is."""
        activity = activity_of(late.data)
        row = self._session_row(object_id) if activity is not None else None
        if row is None:
            return
        view = from_json(row[-1])
        key = _activity_key(late)
        if view.get(ACTIVITY_KEY) is not None and view[ACTIVITY_KEY] > key:
            return  # equal keys: the later arrival sorts after, as in the fold
        view.update({"latest_activity": activity, ACTIVITY_KEY: key})
        self.gathered_objects.add(object_id)
        self.current["sessions"][object_id] = (*row[:-1], to_json(view))

    def _session_row(self, object_id: str) -> tuple[Any, ...] | None:
        if object_id not in self.current["sessions"] and object_id not in self.session_rows:
            self._read_session_rows([object_id])
        return self.current["sessions"].get(object_id) or self.session_rows.get(object_id)

    def current_owner(self, table: str, object_id: str) -> str | None:
        gathered = self.current[table].get(object_id)
        if gathered is not None:
            return gathered[1]
        # Nothing gathered for this object: its stored row is up to date, so no flush (a third
        # of a rebuild's flushes were these, each splitting the batch's COPYs).
        cursor, t, db = self.cursor, self.t, self.db
        cursor.execute(db.sql(f"SELECT owner_id FROM {t[table]} WHERE id = %s"), [object_id])
        found = cursor.fetchone()
        return found["owner_id"] if found else None

    def settle(self, object_id: str) -> tuple[Cursor, Tables, Db]:
        """Before reading or changing an object's stored rows: send what has been gathered if
        any of it is that object's; returns the cursor, tables and db to go on with. (Else its
        stored rows are up to date: flushing anyway split the batch's COPYs at every late
        arrival, and following a stream with many, most of `objects`' time went to them.)"""
        if object_id in self.gathered_objects:
            return self.flush()
        return self.cursor, self.t, self.db

    def flush(self) -> tuple[Cursor, Tables, Db]:
        """Send what has been gathered; returns the cursor, tables and db to go on with."""
        cursor, t, db = self.cursor, self.t, self.db
        db.insert_rows(cursor, t["versions"], VERSION_COLUMNS, self.versions)
        db.insert_rows(cursor, t["history"], HISTORY_COLUMNS, self.history)
        db.insert_rows(cursor, t["changes"], CHANGE_COLUMNS, self.changes)
        for table, rows in self.current.items():
            db.insert_rows(
                cursor,
                t[table],
                CURRENT_COLUMNS,
                list(rows.values()),
                on_conflict=upsert(db, t[table]),
            )
            if table == "sessions":
                self.session_rows.update(rows)
            rows.clear()
        self.versions, self.history, self.changes = [], [], []
        self.gathered_objects.clear()
        return cursor, t, db


def _key(version: Version) -> tuple[int, int, int]:
    first = DELETION_KEY if version.deletion else int(version.key[0])
    return first, version.key[1], version.key[2]


def _activity_key(version: Version) -> list[int]:
    """Its order key without the arrival sequence (the store position), which the stored view
    must not depend on: versions equal in the rest are ordered by arrival, as in the fold."""
    return list(_key(version)[:2])


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


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
