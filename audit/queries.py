"""The read side: every query the read API answers, over the projections' tables. No HTTP here.

Lists are keyset-paginated: each page asks for the rows after the last key it returned, in key
order, so a walk visits every row once even while rows are appended (new rows sort after the walk's
position: positions only grow). Each query is driven by one index:

- events: by position (primary key); `subject` through `event_subjects (clerk_id, position)`;
  `type` through `events (type, position)`, one index range per type merged by position;
- changes: in `(position, object_id, field)` order. `field` through `changes (field, position)`,
  each change's history row then by position; otherwise history drives (`subject`, `actor_ip`
  and `type` through its indexes, else by position), each history row's changes then through
  the `changes` primary key;
- a first page from `since` (events and changes) starts at the position its generation's time
  marks give (`audit.projections.base`), not at position 0;
- histories through `history (object_id, position)` and `(owner_id, position)`, a page's changes
  through the `changes` primary key;
- current-state lists through `(owner_id | user_id, listed_at, id)`;
- timelines through the primary key `(session_id, ordered_at, position)`.

A keyset condition is written `k1 >= %s AND (k1, k2) > (%s, %s)`: the first half is an index
bound on every backend and planner; the row comparison settles ties.

Functions return plain dicts with epoch-millisecond times and parsed JSON; the API renders them.
"""

from __future__ import annotations

import itertools
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg

from audit.addresses import AddressFilter
from audit.aggregates.actor import actor_of
from audit.aggregates.changes import MAX_FIELD_LENGTH, field_keys, field_path, with_enclosing
from audit.application import AuditLog
from audit.projections.base import Tables, from_json, marked_start
from audit.projections.objects import ADDRESS_KEYS_FROM, FIELD_ORDER_FROM
from audit.projections.runner import (
    UnknownProjection,
    active_tables,
    all_projections,
    tracked_position_query,
    tracking_key,
)
from audit.storage import Db, StoreUnavailable

T = TypeVar("T")

# More driving branches than this (a wide `user.*` over many types) become one filtered scan.
MAX_BRANCHES = 24


class ProjectionNotReady(Exception):
    """The read model a query needs is not built yet (or was switched away mid-query twice)."""


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_key: tuple[Any, ...] | None


@dataclass(frozen=True)
class TypeFilter:
    """`type` values: exact names, and prefixes from the `user.*` form."""

    exact: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Sequence[str]) -> TypeFilter:
        exact: list[str] = []
        prefixes: list[str] = []
        for value in values:
            if value.endswith(".*") and len(value) > 2:
                prefixes.append(value[:-1])  # keep the dot: `user.*` matches `user.created`
            else:
                exact.append(value)
        return cls(tuple(dict.fromkeys(exact)), tuple(dict.fromkeys(prefixes)))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)


@dataclass(frozen=True)
class EventFilters:
    types: TypeFilter = field(default_factory=TypeFilter)
    subject: str | None = None
    since: int | None = None
    until: int | None = None


@dataclass(frozen=True)
class ChangeFilters:
    subject: str | None = None
    fields: tuple[str, ...] = ()
    types: TypeFilter = field(default_factory=TypeFilter)
    actor_ip: AddressFilter | None = None
    since: int | None = None
    until: int | None = None


# -- plumbing -------------------------------------------------------------------------------------


def _missing_table(exc: BaseException) -> bool:
    """Whether a failure is a table that does not exist (not built yet, or just switched away)."""
    while exc is not None:
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return True
        if isinstance(exc, StoreUnavailable | sqlite3.OperationalError) and "no such table" in str(
            exc
        ):
            return True
        exc = exc.__cause__  # eventsourcing wraps psycopg's errors in its own
    return False


# The live generation of each projection, per database, so that a read costs one query, not two.
# A switch renames the old generation's tables in the transaction that changes the registry
# (and drops them in later ones), so a stale entry shows itself as a missing table and is then
# looked up again.
_live_generations: weakref.WeakKeyDictionary[Db, dict[str, Tables]] = weakref.WeakKeyDictionary()


def _with_tables(db: Db, projection: str, query: Callable[[Tables], T]) -> T:
    """Run `query` against the live generation; look it up again if a rebuild switched it."""
    known = _live_generations.setdefault(db, {})
    for attempt in (1, 2):
        cached = known.get(projection) if attempt == 1 else None
        if cached is not None:
            tables = cached
        else:
            try:
                tables = active_tables(db, projection)
            except UnknownProjection:
                raise ProjectionNotReady(projection) from None
            except Exception as exc:
                if _missing_table(exc):
                    raise ProjectionNotReady(projection) from None
                raise
            known[projection] = tables
        try:
            return query(tables)
        except ProjectionNotReady:
            # The remembered generation could not answer (a network on one from before the
            # address keys): the live one may be newer. Else a process that only got such
            # reads answered 503 after the switch too (review).
            known.pop(projection, None)
            if cached is None:
                raise
        except Exception as exc:
            if not _missing_table(exc):
                raise
            known.pop(projection, None)
            if attempt == 2:
                raise ProjectionNotReady(projection) from None
    raise ProjectionNotReady(projection)  # pragma: no cover


def _keyset(columns: Sequence[str], after: Sequence[Any] | None) -> tuple[list[str], list[Any]]:
    """Conditions selecting the rows whose key (in `columns` order) sorts after `after`."""
    if after is None:
        return [], []
    if len(columns) == 1:
        return [f"{columns[0]} > %s"], [after[0]]
    marks = ", ".join(["%s"] * len(columns))
    return (
        [f"{columns[0]} >= %s", f"({', '.join(columns)}) > ({marks})"],
        [after[0], *after],
    )


def _alias(column: str) -> str:
    return column.rsplit(".", 1)[-1]


def _select(
    db: Db,
    *,
    source: str,
    columns: str,
    key: Sequence[str],
    branches: Sequence[tuple[str, list[Any]]],
    where: Sequence[str],
    params: Sequence[Any],
    after: Sequence[Any] | None,
    limit: int,
    overlapping: bool = False,
    joined: tuple[str, str] | None = None,
) -> list[Any]:
    """Rows after `after` in key order: one index-driven SELECT per branch, merged by key.

    `branches` are alternative driving conditions (OR-ed); `where` applies to all. Each branch is
    limited on its own, so each reads at most `limit` rows of its index. Branches that may match
    the same row are `overlapping`, and their union drops the copies. `joined` is a JOIN clause
    and its columns, joined to the page's rows (as `page`) once they are found.
    """
    key_where, key_params = _keyset(key, after)
    order = ", ".join(key)
    selects: list[str] = []
    all_params: list[Any] = []
    for branch_sql, branch_params in branches or [("", [])]:
        conditions = [c for c in (branch_sql, *where, *key_where) if c]
        clause = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        selects.append(f"SELECT {columns} FROM {source}{clause} ORDER BY {order} LIMIT %s")
        all_params += [*branch_params, *params, *key_params, limit]
    outer = ", ".join(_alias(column) for column in key)
    if len(selects) == 1:
        statement = selects[0]
    else:
        merged = (" UNION " if overlapping else " UNION ALL ").join(
            f"SELECT * FROM ({s}) b{i}" for i, s in enumerate(selects)
        )
        statement = f"{merged} ORDER BY {outer} LIMIT %s"
        all_params.append(limit)
    if joined is not None:
        clause, joined_columns = joined
        page_key = ", ".join(f"page.{_alias(column)}" for column in key)
        statement = (
            f"SELECT page.*, {joined_columns} FROM ({statement}) page {clause} ORDER BY {page_key}"
        )
    return db.fetchall(statement, all_params, payloads=joined is not None)


def _page(rows: list[Any], limit: int, key: Callable[[Any], tuple[Any, ...]], render) -> Page:
    items = [render(row) for row in rows[:limit]]
    next_key = key(rows[limit - 1]) if len(rows) > limit else None
    return Page(items, next_key)


def _in(db: Db, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """`column` is one of `values`. On PostgreSQL one array parameter: the statement's text is
    then the same whatever the count, so psycopg parses it once and the server can keep its
    plan (an `IN` list of 50 positions was parsed anew on every page: 8% of a changes page's
    CPU)."""
    if len(values) == 1:
        return f"{column} = %s", [values[0]]
    if db.dialect == "postgresql":
        return f"{column} = ANY(%s)", [list(values)]
    return f"{column} IN ({', '.join(['%s'] * len(values))})", list(values)


def _time_where(column: str, since: int | None, until: int | None) -> tuple[list[str], list[Any]]:
    """`since` inclusive, `until` exclusive: [since, until)."""
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append(f"{column} >= %s")
        params.append(since)
    if until is not None:
        where.append(f"{column} < %s")
        params.append(until)
    return where, params


def distinct_types(db: Db, table: str) -> list[str]:
    """Every distinct `type` in `table`, by a skip scan of its `(type, position)` index."""
    rows = db.fetchall(
        "WITH RECURSIVE t(type) AS ("
        f" SELECT MIN(type) FROM {table}"
        f" UNION ALL SELECT (SELECT MIN(type) FROM {table} WHERE type > t.type)"
        " FROM t WHERE t.type IS NOT NULL)"
        " SELECT type FROM t WHERE type IS NOT NULL"
    )
    return [row["type"] for row in rows]


def _resolve_types(db: Db, table: str, types: TypeFilter) -> list[str]:
    """The exact type names a filter stands for (prefixes expanded against what is stored)."""
    names = list(types.exact)
    if types.prefixes:
        for name in distinct_types(db, table):
            if name.startswith(types.prefixes) and name not in names:
                names.append(name)
    return names


# -- events ---------------------------------------------------------------------------------------

# The rest of an event (type, subject, instance, actor) is read from its stored delivery.
_EVENT_COLUMNS = (
    "e.position AS position, e.svix_id AS svix_id, e.occurred_at AS occurred_at,"
    " e.received_at AS received_at"
)
_STORED_COLUMNS = (
    "st.topic AS topic, st.originator_id AS originator_id,"
    " st.originator_version AS originator_version, st.state AS state"
)


class StoreMismatch(RuntimeError):
    """The event index names a stored event the store does not hold at that position."""


def _stored_join(db: Db, position: str) -> str:
    """The event store's row of each event: its payload is read from there, not copied. (LEFT:
    an index row without its stored event must fail loudly, not vanish from a page.)"""
    return f"LEFT JOIN {db.table(db.events_table)} st ON st.{db.position_column} = {position}"


def _event(log: AuditLog, row: Any) -> dict[str, Any]:
    delivery = log.stored_delivery(row) if row["state"] is not None else None
    if delivery is None or delivery.svix_id != row["svix_id"]:
        raise StoreMismatch(
            f"event {row['svix_id']!r}: the store holds"
            f" {delivery.svix_id if delivery else 'nothing'!r} at position {row['position']}"
        )
    # What was signed, from the delivery: the index's text columns hold U+FFFD for a NUL on
    # PostgreSQL, and an event must read the same on either backend.
    return {
        "id": row["svix_id"],
        "position": row["position"],
        "type": delivery.type,
        "subject_id": delivery.subject_id,
        "subject_object": delivery.subject_object,
        "occurred_at": row["occurred_at"],
        "received_at": row["received_at"],
        "instance_id": delivery.instance_id,
        "actor": actor_of(delivery),
        "data": delivery.data,
    }


def events_page(
    log: AuditLog,
    filters: EventFilters,
    *,
    after: tuple[int] | None,
    limit: int,
    upto: int | None = None,
) -> Page:
    """Stored events by position, filtered; `upto` bounds an export to what existed at its start."""
    db = log.db

    def query(t: Tables) -> Page:
        key = ["e.position" if filters.subject is None else "s.position"]
        where, params = _time_where("e.occurred_at", filters.since, filters.until)
        if upto is not None:
            where.append("e.position <= %s")
            params.append(upto)
        if after is None and filters.since is not None:
            start = _start_since(db, t, t["events"], filters.since)
            if start is None:
                return Page([], None)
            where.append(f"{key[0]} >= %s")
            params.append(start)
        types = _resolve_types(db, t["events"], filters.types) if filters.types else []
        if filters.types and not types:
            return Page([], None)
        branches: list[tuple[str, list[Any]]] = []
        source = f"{t['events']} e"
        if filters.subject is not None:
            source = f"{t['event_subjects']} s JOIN {t['events']} e ON e.position = s.position"
            branches = [("s.clerk_id = %s", [filters.subject])]
            if types:
                sql, values = _in(db, "e.type", types)
                where.append(sql)
                params += values
        elif types and len(types) <= MAX_BRANCHES:
            branches = [("e.type = %s", [name]) for name in types]
        elif types:
            sql, values = _in(db, "e.type", types)
            where.append(sql)
            params += values
        rows = _select(
            db,
            source=source,
            columns=_EVENT_COLUMNS,
            key=key,
            branches=branches,
            where=where,
            params=params,
            after=after,
            limit=limit + 1,
            joined=(_stored_join(db, "page.position"), _STORED_COLUMNS),
        )
        return _page(rows, limit, lambda row: (row["position"],), lambda row: _event(log, row))

    return _with_tables(db, "events", query)


def event_by_id(log: AuditLog, svix_id: str) -> dict[str, Any] | None:
    db = log.db

    def query(t: Tables) -> dict[str, Any] | None:
        row = db.fetchone(
            f"SELECT {_EVENT_COLUMNS}, {_STORED_COLUMNS} FROM {t['events']} e"
            f" {_stored_join(db, 'e.position')} WHERE e.svix_id = %s",
            [svix_id],
        )
        return _event(log, row) if row else None

    return _with_tables(db, "events", query)


def last_event_position(db: Db) -> int:
    def query(t: Tables) -> int:
        row = db.fetchone(f"SELECT MAX(position) AS last FROM {t['events']}")
        return row["last"] or 0

    return _with_tables(db, "events", query)


def is_known_id(db: Db, clerk_id: str) -> bool:
    """Whether any stored event concerns this Clerk id."""

    def query(t: Tables) -> bool:
        row = db.fetchone(
            f"SELECT 1 AS found FROM {t['event_subjects']} WHERE clerk_id = %s LIMIT 1",
            [clerk_id],
        )
        return row is not None

    return _with_tables(db, "events", query)


# -- current state ------------------------------------------------------------------------------


def _current(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "owner_id": row["owner_id"],
        "user_id": row["user_id"],
        "organization_id": row["organization_id"],
        "status": row["status"],
        "deleted": bool(row["deleted"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "position": row["position"],
        "view": from_json(row["view"]),
    }


_CURRENT_COLUMNS = (
    "id, owner_id, user_id, organization_id, status, deleted, created_at, updated_at, position,"
    " view"
)


def current_object(db: Db, table: str, object_id: str) -> dict[str, Any] | None:
    """One row of a current-state table (`users`, `organizations`, ...) by id."""

    def query(t: Tables) -> dict[str, Any] | None:
        row = db.fetchone(f"SELECT {_CURRENT_COLUMNS} FROM {t[table]} WHERE id = %s", [object_id])
        return _current(row) if row else None

    return _with_tables(db, "objects", query)


class OrderChanged(ValueError):
    """A list's cursor from before an upgrade changed the list's order: walk it again."""


# From this `objects` version on, current-state lists are in `listed_at` order.
LISTED_FROM_VERSION = 11


def membership_organizations(db: Db, user_id: str) -> list[str]:
    """Every organization the user has or had a membership of, as the read model knows them
    (deleted memberships included): where `as_of` looks for the user's memberships."""

    def query(t: Tables) -> list[str]:
        rows = db.fetchall(
            f"SELECT DISTINCT organization_id FROM {t['memberships']} WHERE user_id = %s"
            " ORDER BY organization_id",
            [user_id],
        )
        return [row["organization_id"] for row in rows if row["organization_id"]]

    return _with_tables(db, "objects", query)


def owned_objects(
    db: Db,
    table: str,
    *,
    by: str,
    owner: str,
    after: tuple[int, int | None, str] | None,
    limit: int,
    include_deleted: bool = True,
) -> Page:
    """Rows of a current-state table whose `by` column (`owner_id`, `user_id`) is `owner`.

    Ordered by (listed_at, id) through the `(by, listed_at, id)` index: the position that put
    each row in this list, so a row listed while a walk is under way comes after its cursor
    (a late `session.created` of a session created earlier than those walked, say: by creation
    time, it sorted behind the cursor and the walk missed it). Without `include_deleted`, only
    current rows: neither they nor their organization or user deleted (Clerk may not send a
    deletion for each membership of a deleted organization).

    A key starts with the order it is in: generations of `objects` before
    LISTED_FROM_VERSION, still served while their successor is built, are in (created_at, id)
    order, rows without a created_at first; a cursor of the other order is OrderChanged.
    """
    assert by in ("owner_id", "user_id")

    def query(t: Tables) -> Page:
        listed = t.version is None or t.version >= LISTED_FROM_VERSION
        order = LISTED_FROM_VERSION if listed else LISTED_FROM_VERSION - 1
        if after is not None and after[0] != order:
            raise OrderChanged(table)
        if listed:
            rows = _select(
                db,
                source=f"{t[table]} AS o",
                columns=f"{_CURRENT_COLUMNS}, listed_at",
                key=["listed_at", "id"],
                branches=[],
                where=_owned_where(t, by, include_deleted),
                params=[owner],
                after=None if after is None else after[1:],
                limit=limit + 1,
            )
            return _page(rows, limit, lambda row: (order, row["listed_at"], row["id"]), _current)
        return _created_order(t, None if after is None else after[1:])

    def _created_order(t: Tables, after: tuple[int | None, str] | None) -> Page:
        base = _owned_where(t, by, include_deleted)
        rows: list[Any] = []
        if after is None or after[0] is None:
            rows = _select(
                db,
                source=f"{t[table]} AS o",
                columns=_CURRENT_COLUMNS,
                key=["id"],
                branches=[],
                where=[*base, "created_at IS NULL"],
                params=[owner],
                after=None if after is None else (after[1],),
                limit=limit + 1,
            )
        if len(rows) <= limit:
            rows += _select(
                db,
                source=f"{t[table]} AS o",
                columns=_CURRENT_COLUMNS,
                key=["created_at", "id"],
                branches=[],
                where=[*base, "created_at IS NOT NULL"],
                params=[owner],
                after=after if after is not None and after[0] is not None else None,
                limit=limit + 1 - len(rows),
            )
        order = LISTED_FROM_VERSION - 1
        return _page(rows, limit, lambda row: (order, row["created_at"], row["id"]), _current)

    return _with_tables(db, "objects", query)


def sorted_page(
    items: list[dict[str, Any]],
    key: Callable[[dict[str, Any]], tuple[Any, ...]],
    *,
    after: tuple[Any, ...] | None,
    limit: int,
) -> Page:
    """A page of `items`, already in `key` order (a fold's lists), after the key `after`."""
    rest = items if after is None else [item for item in items if key(item) > tuple(after)]
    return _page(rest, limit, key, lambda item: item)


def _owned_where(t: Tables, by: str, include_deleted: bool) -> list[str]:
    where = [f"{by} = %s"]
    if not include_deleted:
        where.append("deleted = 0")
        where += [
            f"NOT EXISTS (SELECT 1 FROM {t[parents]} AS p"
            f" WHERE p.id = o.{column} AND p.deleted = 1)"
            for parents, column in (("organizations", "organization_id"), ("users", "user_id"))
        ]
    return where


# -- history and changes ------------------------------------------------------------------------

_HISTORY_COLUMNS = (
    "position, object_id, object_type, owner_id, event_id, type, occurred_at, received_at,"
    " actor, stale"
)


def _versioned_event(row: Any) -> dict[str, Any]:
    """What history and change rows both say about the event that versioned an object."""
    return {
        "position": row["position"],
        "object_id": row["object_id"],
        "object_type": row["object_type"],
        "owner_id": row["owner_id"],
        "event_id": row["event_id"],
        "type": row["type"],
        "occurred_at": row["occurred_at"],
        "received_at": row["received_at"],
        "actor": from_json(row["actor"]),
        "stale": bool(row["stale"]),
    }


def history_page(
    db: Db,
    *,
    by: str,
    clerk_id: str,
    after: tuple[int, str] | None,
    limit: int,
    since: int | None = None,
    until: int | None = None,
) -> Page:
    """Versions of one object (`by="object_id"`) or of everything an owner owns (`"owner_id"`),
    oldest first by store position."""
    assert by in ("object_id", "owner_id")

    def query(t: Tables) -> Page:
        where, params = _time_where("occurred_at", since, until)
        rows = _select(
            db,
            source=t["history"],
            columns=_HISTORY_COLUMNS,
            key=["position", "object_id"],
            branches=[(f"{by} = %s", [clerk_id])],
            where=where,
            params=params,
            after=after,
            limit=limit + 1,
        )
        page = _page(rows, limit, lambda row: (row["position"], row["object_id"]), _versioned_event)
        changes = _changes_of(db, t, page.items)
        for entry in page.items:
            entry["changes"] = changes.get((entry["position"], entry["object_id"]), [])
        return page

    return _with_tables(db, "objects", query)


def _changes_of(
    db: Db, t: Tables, entries: Sequence[dict[str, Any]]
) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """The changes of these history entries, by entry key, each entry's sorted by field (as
    its version's diff sorted them), in one query through the primary key."""
    if not entries:
        return {}
    positions = sorted({entry["position"] for entry in entries})
    rows = _Side().rows_at(db, t["changes"], _CHANGE_COLUMNS, positions)
    changes: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda row: row["field"]):
        changes.setdefault((row["position"], row["object_id"]), []).append(
            {
                "field": row["field"],
                "from": from_json(row["from_value"]),
                "to": from_json(row["to_value"]),
            }
        )
    return changes


# A change row holds only what changed; its event's facts, and what changes are filtered by
# besides the field, are in the event's history row (one per position). A page is a join of the
# two, done here as an index nested loop: the rows of the table whose index drives, in key order
# (the other table's conditions as an EXISTS on it, so that every row found is wanted), then the
# other table's rows at their positions, by primary key. (Written as one SQL join, PostgreSQL
# merge-joined the whole of `changes` from its first row whenever the rows it wanted were not
# spread evenly over the positions: 12 ms for one page of `type=`. Filtered after the fact in
# Python instead of by EXISTS, `field=first_name&since=` read 180,000 changes for one page: 2 s.)
_CHANGE_COLUMNS = "position, object_id, field, from_value, to_value"
# History rows are read in rounds, as it is not known how many changes each has that are wanted
# (at least one). Rounds double up to a maximum: their positions are the next statement's
# parameters (PostgreSQL takes at most 65,535 a statement, SQLite's default build 32,766).
_FIRST_ROUND_ROWS = 16  # a version has ten or so changes
_MAX_ROUND_ROWS = 1000


def _change(row: Any) -> dict[str, Any]:
    return {
        **_versioned_event(row),
        "field": row["field"],
        "from": from_json(row["from_value"]),
        "to": from_json(row["to_value"]),
    }


@dataclass
class _Side:
    """One table's share of a changes query: its conditions (ANDed) and their parameters."""

    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, condition: str, params: Sequence[Any]) -> None:
        self.where.append(condition)
        self.params += params

    def exists(
        self, table: str, outer: str, *, per_row: bool = False
    ) -> tuple[list[str], list[Any]]:
        """This side's conditions as one on a row of the `outer` table: that the row of `table`
        at its position meets them (none, if this side has no conditions). `per_row` (PostgreSQL
        only): checked for each outer row by key, never as a join (a planner does not turn an
        EXISTS whose subquery has an OFFSET into a join)."""
        if not self.where:
            return [], []
        conditions = " AND ".join(self.where)
        offset = " OFFSET 0" if per_row else ""
        return [
            f"EXISTS (SELECT 1 FROM {table} other"
            f" WHERE other.position = {outer}.position AND {conditions}{offset})"
        ], list(self.params)

    def rows_at(
        self,
        db: Db,
        table: str,
        columns: str,
        positions: Sequence[int],
        after: tuple[int, str, str] | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        """The rows at these positions that meet this side's conditions; with `limit`, the
        first in key order after `after`."""
        where, params = _in(db, "position", positions)
        key_where, key_params = _keyset(["position", "object_id", "field"], after)
        conditions = " AND ".join([where, *self.where, *key_where])
        tail = "" if limit is None else " ORDER BY position, object_id, field LIMIT %s"
        return db.fetchall(
            f"SELECT {columns} FROM {table} WHERE {conditions}{tail}",
            [*params, *self.params, *key_params, *([] if limit is None else [limit])],
        )


def changes_page(
    db: Db,
    filters: ChangeFilters,
    *,
    after: tuple[int, str, str] | None,
    limit: int,
    upto: int | None = None,
) -> Page:
    """Field-level changes by (position, object_id, field), filtered."""

    def query(t: Tables) -> Page:
        history, changes = _Side(), _Side()
        # Which side holds each event's type, time and IP: `objects` v3 kept them (indexed) on
        # every change row. It is read while a newer version is being built beside it.
        facts = changes if t.version is not None and t.version < 4 else history
        time_where, time_params = _time_where("occurred_at", filters.since, filters.until)
        facts.where, facts.params = list(time_where), list(time_params)
        facts_table = t["changes"] if facts is changes else t["history"]
        types = _resolve_types(db, facts_table, filters.types) if filters.types else []
        if filters.types and not types:
            return Page([], None)
        # Each candidate: its alternative conditions, the side they are on, and whether it can
        # drive: walk its branches, each through an index in position order.
        candidates: list[tuple[list[tuple[str, list[Any]]], _Side, bool]] = []
        if filters.subject is not None:
            subject = [("object_id = %s", [filters.subject]), ("owner_id = %s", [filters.subject])]
            # A membership is its organization's, and concerns its user too (SPEC 3): a
            # user's role changes are theirs to see.
            subject.append((_is_membership_of(db, t), [filters.subject]))
            candidates.append((subject, history, True))
        address: tuple[list[tuple[str, list[Any]]], _Side, bool] | None = None
        if filters.actor_ip is not None:
            branches, drives = _address_candidate(db, t, filters.actor_ip)
            address = (branches, facts, drives)
            if drives and filters.actor_ip.is_network:
                candidates.append(address)  # a few rows: they drive, ahead of a field's
                address = None
        field_filter: _FieldFilter | None = None
        if filters.fields:
            # An address removed is one change at `email_addresses.idn_x`: it is a change of
            # `email_addresses.idn_x.email_address` too.
            # No change is recorded at a path longer than MAX_FIELD_LENGTH (one deeper is at
            # an enclosing path that fits): a hundred long fields were 24,000 parameters.
            paths = dict.fromkeys(
                path
                for name in filters.fields
                for path in with_enclosing(name)
                if len(path) <= MAX_FIELD_LENGTH
            )
            if not paths:
                return Page([], None)
            field_filter = _FieldFilter(db, t, filters.fields, list(paths))
            candidates.append((field_filter.branches, changes, field_filter.can_drive))
        if address is not None:
            candidates.append(address)
        if types:
            candidates.append(([("type = %s", [name]) for name in types], facts, True))
        # The first filter that can drive drives; the others filter what it finds. Without
        # one, the side with the time drives, by position (history: a tenth the size).
        driving, driver = next(
            (
                (c, side)
                for c, side, can_drive in candidates
                if can_drive and len(c) <= MAX_BRANCHES
            ),
            ([], facts),
        )
        for candidate, side, _ in candidates:
            if candidate is not driving:
                side.add(*_any_condition(db, candidate))
        if upto is not None:
            driver.add("position <= %s", [upto])
        if after is None and filters.since is not None:
            start = _start_since(db, t, facts_table, filters.since)
            if start is None:
                return Page([], None)
            driver.add("position >= %s", [start])
            if facts is not driver:
                # Where `since` is checked too: PostgreSQL does not carry a range across the
                # join's equality, and merge-joined the history from its first row.
                facts.add("position >= %s", [start])
        if driver is history:
            # An event is both its object's and its owner's: those branches find it twice.
            overlapping = filters.subject is not None and driving is candidates[0][0]
            rows = _walk_from_history(
                db, t, (driving, overlapping), history, changes, after, limit + 1
            )
        else:
            # Changes of a field from a time on: after the marks' start nearly every event is
            # that late, so each change's event is best checked by key, row by row. PostgreSQL,
            # taking position and time as independent, expected few and hashed the whole range
            # (11 ms at 200,000 events, against 1.5). With any other condition on the events,
            # matches may be sparse, and its choice stands.
            since_alone = (
                filters.since is not None
                and filters.until is None
                and filters.actor_ip is None
                and not types
            )
            per_row = since_alone and facts is history and db.dialect == "postgresql"
            rows = _walk_from_changes(
                db, t, driving, history, changes, after, limit + 1, per_row=per_row
            )
        if field_filter is not None:
            field_filter.learn_from(rows)
        return _page(
            rows, limit, lambda row: (row["position"], row["object_id"], row["field"]), _change
        )

    return _with_tables(db, "objects", query)


# The paths under a `field=` name that a page reads each through the field's index: with more,
# the name's whole range filters what another index finds.
MAX_PATHS_UNDER = 8
# Per database and generation, the paths known under each name looked under (None: more than
# MAX_PATHS_UNDER), so that a page does not look again. A hint, never the answer (`_FieldFilter`).
_paths_under_known: weakref.WeakKeyDictionary[Db, dict[tuple[str, str], tuple[str, ...] | None]] = (
    weakref.WeakKeyDictionary()
)
_PATHS_UNDER_KNOWN_MOST = 4096


class _FieldFilter:
    """What `field=` of `names` finds: changes at `paths` (the names and the paths enclosing
    them), and at every path under a name (`name.` and longer): a change to a key of
    `public_metadata` is a change of `public_metadata`.

    Paths compare byte by byte (BYTE_ORDER), so those under a name are the range from `name.`
    up to `name/`. Read as one range of the field's index, its rows come in field order, and
    a page sorts them all (SQLite always; PostgreSQL, when it does not walk the whole table by
    position instead): so the known paths under a name are each a branch, in position order,
    and so is each gap between them, which holds nothing unless a path appeared since they
    were looked up (`learn_from` then forgets them). A page is one statement, so it is right
    whatever is known; what is known only makes it fast. A name with more than
    MAX_PATHS_UNDER paths under it filters by its range (`can_drive` is False). A live
    generation older than FIELD_ORDER_FROM keeps paths in the database's own order: it finds
    none under the names, as before that version.
    """

    def __init__(self, db: Db, t: Tables, names: Sequence[str], paths: list[str]) -> None:
        self.db, self.t = db, t
        self.can_drive = True
        self.prefixes: list[str] = []
        if t.version is None or t.version >= FIELD_ORDER_FROM:
            # Only a well-formed path has paths under it (`a\` would look under `a\.`).
            looked = [f"{n}." for n in dict.fromkeys(names) if field_path(field_keys(n)) == n]
            looked = [p for p in looked if len(p) <= MAX_FIELD_LENGTH]
            # The outermost: `a.b.` is in `a.`'s range.
            self.prefixes = [
                p for p in looked if not any(o != p and p.startswith(o) for o in looked)
            ]
        exact = [p for p in paths if not any(p.startswith(prefix) for prefix in self.prefixes)]
        self.branches: list[tuple[str, list[Any]]] = [("field = %s", [p]) for p in exact]
        known = self._known(self.prefixes)
        for prefix in self.prefixes:
            under = known[prefix]
            if under is None:  # too many: its whole range, the one gap, filters
                self.can_drive = False
                under = ()
            self.branches += [("field = %s", [path]) for path in under]
            bounds = [prefix, *under, _after_prefix(prefix)]
            for number, (low, high) in enumerate(itertools.pairwise(bounds)):
                above = ">" if number else ">="  # a known path is its own branch's
                self.branches.append((f"(field {above} %s AND field < %s)", [low, high]))

    def _known(self, prefixes: list[str]) -> dict[str, tuple[str, ...] | None]:
        cache = _paths_under_known.setdefault(self.db, {})
        found = {p: cache[key] for p in prefixes if (key := (self.t.prefix, p)) in cache}
        missing = [p for p in prefixes if p not in found]
        if missing:
            looked = self._look_under(missing)
            if len(cache) + len(looked) > _PATHS_UNDER_KNOWN_MOST:
                cache.clear()
            for prefix, under in looked.items():
                cache[(self.t.prefix, prefix)] = under
            found.update(looked)
        return found

    def _look_under(self, prefixes: list[str]) -> dict[str, tuple[str, ...] | None]:
        """The distinct paths under each prefix, by a skip scan of the field's index, in one
        statement (None for a prefix with more than MAX_PATHS_UNDER)."""
        table = self.t["changes"]
        scans, selects, params = [], [], []
        for number, prefix in enumerate(prefixes):
            end = _after_prefix(prefix)
            scans.append(
                f"u{number}(field, n) AS ("
                f" SELECT (SELECT MIN(field) FROM {table} WHERE field >= %s AND field < %s), 1"
                f" UNION ALL SELECT (SELECT MIN(field) FROM {table}"
                f" WHERE field > u{number}.field AND field < %s), n + 1"
                f" FROM u{number} WHERE u{number}.field IS NOT NULL AND n <= %s)"
            )
            params += [prefix, end, end, MAX_PATHS_UNDER]
            selects.append(f"SELECT {number} AS k, field FROM u{number} WHERE field IS NOT NULL")
        rows = self.db.fetchall(
            f"WITH RECURSIVE {', '.join(scans)} {' UNION ALL '.join(selects)}", params
        )
        under: dict[str, list[str]] = {prefix: [] for prefix in prefixes}
        for row in rows:
            under[prefixes[row["k"]]].append(row["field"])
        return {
            prefix: None if len(paths) > MAX_PATHS_UNDER else tuple(sorted(paths))
            for prefix, paths in under.items()
        }

    def learn_from(self, rows: Sequence[Any]) -> None:
        """Forget the paths known under a name when a page found one more (in a gap)."""
        cache = _paths_under_known.get(self.db)
        if not cache:
            return
        for row in rows:
            field = row["field"]
            for prefix in self.prefixes:
                under = cache.get((self.t.prefix, prefix))
                if under is not None and field.startswith(prefix) and field not in under:
                    cache.pop((self.t.prefix, prefix), None)


# On SQLite, a network with fewer history rows than this drives the walk (its rows, read
# through the IP index, sorted by position); one with more filters it, the index hidden from
# the planner, which otherwise read and sorted the whole range for every page (250-300 ms a
# page for `10.0.0.0/8` at 1,000,000 events: review). PostgreSQL's statistics choose well.
RARE_NETWORK_ROWS = 1000


def _address_candidate(
    db: Db, t: Tables, address: AddressFilter
) -> tuple[list[tuple[str, list[Any]]], bool]:
    """`actor_ip=`'s condition, and whether it can drive. An address is one key. A network's
    keys are one range of the IP index, whose rows come in key order: it filters what another
    filter (or the walk by position) finds, unless it holds few rows. A generation from before
    the keys answers addresses only."""
    if t.version is not None and t.version < ADDRESS_KEYS_FROM:
        if address.is_network:
            raise ProjectionNotReady("objects")
        return [("actor_ip = %s", [text]) for text in address.texts], True
    if not address.is_network:
        return [("actor_ip_key = %s", [address.low])], True
    bounds = [address.low, address.high]
    in_range = "(actor_ip_key >= %s AND actor_ip_key <= %s)"
    if db.dialect != "sqlite":
        return [(in_range, bounds)], False
    rows = db.fetchone(
        f"SELECT COUNT(*) AS n FROM (SELECT 1 FROM {t['history']} WHERE {in_range} LIMIT %s) AS r",
        [*bounds, RARE_NETWORK_ROWS],
    )
    if rows is not None and rows["n"] < RARE_NETWORK_ROWS:
        return [(in_range, bounds)], True
    return [("(+actor_ip_key >= %s AND +actor_ip_key <= %s)", bounds)], False


def _after_prefix(prefix: str) -> str:
    """The least text after every text that starts with `prefix` (ending in `.`), in byte order:
    `/` follows `.`."""
    return prefix[:-1] + "/"


def _is_membership_of(db: Db, t: Tables) -> str:
    """A history row's object is a membership of the user in the one parameter (deleted ones
    too). On PostgreSQL the ids are an array computed once (an InitPlan), then looked up in the
    object index: as a semi-join, the planner was free to walk the whole history instead."""
    memberships = f"SELECT id FROM {t['memberships']} WHERE user_id = %s"
    if db.dialect == "postgresql":
        return f"object_id = ANY(ARRAY({memberships}))"
    return f"object_id IN ({memberships})"


# From which version each projection's generations keep time marks, as the projections say.
_TIME_MARKS_FROM = {
    projection.name: projection.time_marks_from
    for projection in all_projections()
    if projection.time_marks_from is not None
}


def _start_since(db: Db, t: Tables, table: str, since: int) -> int | None:
    """Where a first page from `since` starts walking by position: no row of `table` before it
    is that late (None: no row is). Times mostly rise with positions, and a planner expecting
    late rows spread evenly walked the whole earlier stream to find them (318 ms a page at
    1,000,000 events), or, through the time index, the whole range from `since` on."""
    if t.version is not None and t.version < _TIME_MARKS_FROM[t.projection]:
        # A live generation from before the marks, read while its successor is being built:
        # the first such row, through the time index. (`+ 0`: for `MIN(position)` a planner
        # would walk the primary key until a row was that late.)
        row = db.fetchone(
            f"SELECT MIN(position + 0) AS first FROM {table} WHERE occurred_at >= %s", [since]
        )
        return None if row is None else row["first"]
    return marked_start(db, t, since)


def _values(candidate: list[tuple[str, list[Any]]]) -> list[Any]:
    return [value for _, values in candidate for value in values]


def _any_condition(db: Db, candidate: list[tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
    """One condition for a filter's alternatives, its equalities of one column as one
    `column IN (...)`. (A hundred deep `field`s are a thousand or more enclosing paths: as
    ORs, more than SQLite's parser takes.)"""
    equalities = [(sql, params) for sql, params in candidate if sql.endswith(" = %s")]
    columns = {sql.removesuffix(" = %s") for sql, _ in equalities}
    if len(columns) != 1:
        return f"({' OR '.join(sql for sql, _ in candidate)})", _values(candidate)
    condition, params = db.any_of(_values(equalities))
    others = [(sql, values) for sql, values in candidate if not sql.endswith(" = %s")]
    sql = " OR ".join([f"{columns.pop()} {condition}", *(sql for sql, _ in others)])
    return (f"({sql})" if others else sql), [*params, *_values(others)]


def _walk_from_history(
    db: Db,
    t: Tables,
    driving: tuple[list[tuple[str, list[Any]]], bool],
    history: _Side,
    changes: _Side,
    after: tuple[int, str, str] | None,
    wanted: int,
) -> list[dict[str, Any]]:
    """History rows with wanted changes, in position order through their index (`driving`: its
    branches, and whether they overlap), then those changes by key, no more than are wanted."""
    branches, overlapping = driving
    with_changes, with_changes_params = changes.exists(t["changes"], t["history"])
    found: list[dict[str, Any]] = []
    history_after = (after[0] - 1,) if after else None  # the row at `after` may have more
    count = _FIRST_ROUND_ROWS
    while True:
        events = _select(
            db,
            source=t["history"],
            columns=_HISTORY_COLUMNS,
            key=["position"],
            branches=branches,
            where=[*history.where, *with_changes],
            params=[*history.params, *with_changes_params],
            after=history_after,
            limit=count,
            overlapping=overlapping,
        )
        if events:
            by_position = {row["position"]: row for row in events}
            rows = changes.rows_at(
                db, t["changes"], _CHANGE_COLUMNS, list(by_position), after, wanted - len(found)
            )
            found += _joined(rows, by_position)
        if len(found) >= wanted or len(events) < count:
            return found
        history_after, count = (events[-1]["position"],), min(count * 2, _MAX_ROUND_ROWS)


def _walk_from_changes(
    db: Db,
    t: Tables,
    driving: list[tuple[str, list[Any]]],
    history: _Side,
    changes: _Side,
    after: tuple[int, str, str] | None,
    wanted: int,
    *,
    per_row: bool,
) -> list[dict[str, Any]]:
    """Wanted changes in key order through their index (the field's), then their events'
    history rows."""
    with_event, with_event_params = history.exists(t["history"], t["changes"], per_row=per_row)
    rows = _select(
        db,
        source=t["changes"],
        columns=_CHANGE_COLUMNS,
        key=["position", "object_id", "field"],
        branches=driving,
        where=[*changes.where, *with_event],
        params=[*changes.params, *with_event_params],
        after=after,
        limit=wanted,
    )
    if not rows:
        return []
    positions = sorted({row["position"] for row in rows})
    events = _Side().rows_at(db, t["history"], _HISTORY_COLUMNS, positions)
    return _joined(rows, {row["position"]: row for row in events})


def _joined(changes: list[Any], events: dict[int, Any]) -> list[dict[str, Any]]:
    """Each change (in key order) with its event's history row. Every change has one, written
    and rewritten with it in one transaction: a missing one fails the read, not shortens it."""
    return [{**events[row["position"]], **row} for row in changes]


def last_change_position(db: Db) -> int:
    def query(t: Tables) -> int:
        row = db.fetchone(f"SELECT MAX(position) AS last FROM {t['changes']}")
        return row["last"] or 0

    return _with_tables(db, "objects", query)


# -- timelines ----------------------------------------------------------------------------------


def _timeline_entry(row: Any) -> dict[str, Any]:
    return {
        "session_id": row["session_id"],
        "occurred_at": row["occurred_at"],
        "position": row["position"],
        "user_id": row["user_id"],
        "event_id": row["event_id"],
        "type": row["type"],
        "status": row["status"],
        "actor": from_json(row["actor"]),
        "activity": from_json(row["activity"]),
    }


# A timeline cursor: (walk_upto, arrived, ordered_at, position). `walk_upto` is the store
# position the timelines had applied when the walk began; `arrived` is 1 once the walk has gone
# past the session's events up to it, to those stored since, in store order (`ordered_at` 0).
TimelineKey = tuple[int, int, int, int]
_TIMELINE_COLUMNS = (
    "session_id, ordered_at, occurred_at, position, user_id, event_id, type, status, actor,"
    " activity"
)


def _first_timeline_page(
    db: Db, t: Tables, session_id: str, where: list[str], params: list[Any], limit: int
) -> Page:
    """A walk's first page and its start, the position the timelines had applied, in one
    statement, so in one snapshot: rows and position commit together, so every event of the
    session in it lies at or before that position, and none stored since is missed by a walk
    that ends here. (The session's highest position instead took reading every one of its
    events: 11 ms a first page at 30,000; a statement of its own cost a page half again.)"""
    # A scalar subquery (run once), not a join: joined, PostgreSQL estimating few rows for a
    # session took the tracking row first and sorted all of the session's (16.5 ms at 20,000).
    applied = f"({tracked_position_query(db)})"
    key = tracking_key(t.projection, t.generation)
    conditions = " AND ".join(["session_id = %s", f"position <= {applied}", *where])
    found = db.fetchall(
        f"SELECT {_TIMELINE_COLUMNS}, {applied} AS walk_upto FROM {t['session_events']}"
        f" WHERE {conditions} ORDER BY ordered_at, position LIMIT %s",
        [key, session_id, key, *params, limit + 1],
    )
    start = found[0]["walk_upto"] if found else 0
    return _timeline_page([(0, row) for row in found], limit, start)


def _timeline_page(rows: list[tuple[int, Any]], limit: int, upto: int) -> Page:
    """Rows tagged 0 (stored when the walk began, in time order) or 1 (stored since)."""
    return _page(
        rows,
        limit,
        lambda tagged: (
            upto,
            tagged[0],
            0 if tagged[0] else tagged[1]["ordered_at"],
            tagged[1]["position"],
        ),
        lambda tagged: _timeline_entry(tagged[1]),
    )


def session_timeline(
    db: Db,
    session_id: str,
    *,
    after: TimelineKey | None,
    limit: int,
    since: int | None = None,
    until: int | None = None,
) -> Page:
    """A session's events in occurred_at order (then store position); one without an
    `occurred_at` where it was received (`ordered_at`).

    An event stored while a walk is under way may be older than the walk's cursor (a late
    delivery, a Svix retry), and would sort behind it, never seen (SPEC 4: a walk visits every
    item once, even while new events arrive). So a walk takes the events that were stored when
    it began in time order, then those stored since in store order, which always land ahead."""

    def query(t: Tables) -> Page:
        where, params = _time_where("occurred_at", since, until)
        if after is None:
            return _first_timeline_page(db, t, session_id, where, params, limit)
        upto, arrived, ordered_at, position = after

        def rows_of(
            key: list[str], bound: str, after_key: tuple[int, ...] | None, count: int
        ) -> list[Any]:
            return _select(
                db,
                source=t["session_events"],
                columns=_TIMELINE_COLUMNS,
                key=key,
                branches=[("session_id = %s", [session_id])],
                where=[*where, bound],
                params=[*params, upto],
                after=after_key,
                limit=count,
            )

        rows: list[tuple[int, Any]] = []
        if not arrived:
            found = rows_of(
                ["ordered_at", "position"], "position <= %s", (ordered_at, position), limit + 1
            )
            rows += [(0, row) for row in found]
        if len(rows) <= limit:
            since_began = rows_of(
                ["position"],
                "position > %s",
                (position,) if arrived else None,
                limit + 1 - len(rows),
            )
            rows += [(1, row) for row in since_began]
        return _timeline_page(rows, limit, upto)

    return _with_tables(db, "timelines", query)
