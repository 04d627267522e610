"""What a projection is: a name, a schema version, its tables, and a handler for deliveries."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from audit.aggregates.delivery import Delivery
from audit.jsontext import dumps, loads
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


def to_json(value: Any) -> str:
    return dumps(value, sort_keys=True)


def from_json(text: str | None) -> Any:
    return None if text is None else loads(text)
