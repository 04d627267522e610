"""What a projection is: a name, a schema version, its tables, and a handler for deliveries."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from audit.aggregates.delivery import Delivery
from audit.jsontext import dumps_sorted, loads
from audit.storage import Cursor, Db


@dataclass(frozen=True)
class StoredDelivery:
    """A delivery read back from the store, with its position in the store."""

    position: int
    delivery: Delivery


class Tables:
    """Physical names of one generation of a projection's tables, and, where known (reads), the
    projection version that made them: a live generation may be older than the code reading it
    while its successor is being built."""

    def __init__(
        self, db: Db, projection: str, generation: int, version: int | None = None
    ) -> None:
        self.db = db
        self.projection = projection
        self.generation = generation
        self.version = version
        self.prefix = f"p_{projection}_g{generation}_"

    def __getitem__(self, logical: str) -> str:
        return self.db.table(self.prefix + logical)

    def index(self, logical: str) -> str:
        """An index name: unqualified (PostgreSQL puts it in its table's schema)."""
        return f'"{self.prefix}{logical}"'


class Projection(ABC):
    """A read model. Raise `version` whenever `schema()` or `handle()` changes what is stored."""

    name: ClassVar[str]
    version: ClassVar[int]
    table_names: ClassVar[tuple[str, ...]]
    # How much work a rebuild of it is, relative to the others: seconds of its steps per
    # 1,000,000 events (bench/rebuild.py). Rebuilds in processes balance by it.
    rebuild_seconds: ClassVar[float] = 1.0
    # The version from which its generations keep time marks (below), if it keeps them: a live
    # generation of an older version is read without them while its successor is built.
    time_marks_from: ClassVar[int | None] = None

    @abstractmethod
    def schema(self, t: Tables, db: Db) -> list[str]:
        """DDL creating this generation's tables and indexes."""

    def read_indexes(self, t: Tables) -> list[str]:
        """`CREATE INDEX IF NOT EXISTS` statements only reads need, not `apply`. A build from
        position 0 creates them when it goes live: one sort at the end, not an index update
        per row while it runs."""
        return []

    @abstractmethod
    def apply(self, cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
        """Apply deliveries in position order: a whole batch, or one at a time when a batch
        has failed. Runs inside the transaction that also advances the position, so a
        projection may gather its writes and send them at the end."""


# Time marks. A delivery's `occurred_at` mostly rises with its store position, but not always (late
# arrivals), so a time index cannot say where in position order the deliveries from a time on
# begin: PostgreSQL walked the whole earlier stream to find them, or the time index's whole
# range. A projection that keeps marks records, for each run of TIME_MARK_POSITIONS positions,
# the latest `occurred_at` of the deliveries it has applied up to that run's end. Marks never
# fall as runs go on, so one index probe finds the first run whose mark reaches a time, and no
# delivery before that run is that late.
TIME_MARK_POSITIONS = 1024
_TIME_MARK_COLUMNS = (("run", "bigint"), ("latest", "bigint"))


def time_marks_schema(t: Tables) -> str:
    return f"CREATE TABLE {t['time_marks']} (run BIGINT PRIMARY KEY, latest BIGINT NOT NULL)"


def time_marks_index(t: Tables) -> str:
    return (
        f"CREATE INDEX IF NOT EXISTS {t.index('time_marks_latest')}"
        f" ON {t['time_marks']} (latest, run)"
    )


def mark_times(cursor: Cursor, t: Tables, db: Db, events: Sequence[StoredDelivery]) -> None:
    """Raise the time marks of the runs these deliveries (in position order, after every
    delivery applied before them) fall in."""
    times = [(e.position, e.delivery.occurred_at) for e in events]
    if all(occurred_at is None for _, occurred_at in times):
        return
    cursor.execute(db.sql(f"SELECT latest FROM {t['time_marks']} ORDER BY run DESC LIMIT 1"))
    last = cursor.fetchone()
    latest: int | None = None if last is None else last["latest"]
    marks: dict[int, int] = {}
    for position, occurred_at in times:
        if occurred_at is not None:
            latest = occurred_at if latest is None else max(latest, occurred_at)
        if latest is not None:
            marks[position // TIME_MARK_POSITIONS] = latest
    db.insert_rows(
        cursor,
        t["time_marks"],
        _TIME_MARK_COLUMNS,
        list(marks.items()),
        on_conflict="ON CONFLICT (run) DO UPDATE SET latest = excluded.latest",
    )


def marked_start(db: Db, t: Tables, since: int) -> int | None:
    """The first position of the first run whose mark reaches `since`: no delivery this
    generation applied before it occurred at `since` or later (None: none did)."""
    row = db.fetchone(
        f"SELECT run FROM {t['time_marks']} WHERE latest >= %s ORDER BY latest, run LIMIT 1",
        [since],
    )
    return None if row is None else int(row["run"]) * TIME_MARK_POSITIONS


# Read models' JSON: keys sorted, so equal values are equal text.
to_json = dumps_sorted


def from_json(text: str | None) -> Any:
    return None if text is None else loads(text)
