"""Running projections: exactly once per event, versioned generations, rebuilds, poison events.

Every step runs in one transaction that locks the projection's tracking row, reads the next batch
of stored events after the recorded position, applies them, and records the new position. A crash
anywhere rolls the whole step back; a restart carries on from the recorded position. Two runners
(in two processes) on one projection serialise on that row lock, so neither applies an event twice.

Each projection's tables belong to a generation (`p_<name>_g<N>_<table>`); the registry says which
generation reads use. A schema version bump (or `audit rebuild`) builds a new generation from
position 0 beside the live one; once it has caught up, one transaction points reads at it and
retires the old tables, which are then dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from eventsourcing.persistence import Tracking

from audit.aggregates.streams import DeliveryMarker
from audit.application import AuditLog
from audit.projections.base import Projection, StoredDelivery, Tables
from audit.projections.events import EventIndex
from audit.projections.objects import ObjectsProjection
from audit.projections.pace import FollowingPace
from audit.projections.timelines import SessionTimelines
from audit.storage import (
    Cursor,
    Db,
    EventWaiter,
    is_database_failure,
    is_store_down,
    setup_lock,
    unavailable_reason,
)

log = logging.getLogger("audit.projections")

BATCH_SIZE = 500
# Steps of `audit project`, the projections' process of `audit serve`, by dialect. On
# PostgreSQL, after a burst, it catches up in fewer, larger steps, which cost less a record
# (fewer look-ups, COPYs and commits): following 30,000 deliveries took 7.1 s of CPU in steps
# of 2,000 against 7.9 s in steps of 500 (bench/rebuild.py --follow), and the webhooks arriving
# meanwhile gained (bench/ingest.py). Not on SQLite, where a step holds the file's one write
# lock, which webhooks wait for; nor for `audit rebuild`, whose processes then took 153 MB at
# the peak against 88 MB, and were no faster (100,000 events, one run each: 24.0 s, 21.5 s).
FOLLOWING_BATCH_SIZES = {"sqlite": BATCH_SIZE, "postgresql": 2000}
# Decoded deliveries kept for the other projections of a round: a batch's worth and more
# (a step of 2,000 records holds about 1,000). Four times the steps of 2,000 took 50 MB more.
DECODED_CACHE_SIZE = 4 * BATCH_SIZE
COALESCE_SECONDS = 0.25
# How often a follower steps its projections though nothing new was stored: a build that another
# process registered or left part-way (an interrupted `audit rebuild`) is then carried on.
RECHECK_SECONDS = 30.0
# A generation whose step or switch failed, the database being up (a lock timeout on its tables,
# an index its data cannot have), is set aside for a pause that doubles with each failure in a
# row, while the others go on: one projection's trouble must not stop every read model, nor
# rebuild a failing index twice a second.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
MARKER_TOPIC = DeliveryMarker.Created.TOPIC
# A switched-away generation's tables are renamed with this prefix, then dropped.
RETIRED = "retired_"


def all_projections() -> list[Projection]:
    return [EventIndex(), ObjectsProjection(), SessionTimelines()]


class UnknownProjection(LookupError):
    pass


class NewerVersion(Exception):
    """The store's reads of a projection use a newer version than this release's."""

    def __init__(self, name: str, store_version: int, release_version: int) -> None:
        super().__init__(name, store_version, release_version)
        self.name, self.store_version, self.release_version = name, store_version, release_version


class _PoisonInBatch(Exception):
    """An event of the batch failed: apply the batch again, one guarded event at a time."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: int
    generation: int
    building_version: int | None
    building_generation: int | None


class Projector:
    """Keeps a set of projections up to date with the store."""

    def __init__(
        self,
        audit_log: AuditLog,
        projections: Sequence[Projection] | None = None,
        *,
        batch_size: int = BATCH_SIZE,
        register: bool = True,
    ) -> None:
        """`register`: set up the registry and start the builds of raised versions, as every
        process that steps or serves does; without, only `status` can be used (no writes)."""
        self.log = audit_log
        self.db: Db = audit_log.db
        self.projections = {p.name: p for p in (projections or all_projections())}
        self.batch_size = batch_size
        # Every projection reads the same events: decode each once, not once per projection.
        self._decoded: OrderedDict[int, StoredDelivery] = OrderedDict()
        self._warned_newer: dict[str, int] = {}  # the newer store versions warned of
        # (name, generation, whether the build) -> when it may be tried again, and the pause
        # that set it aside. A build set aside here that another process switches is live: a
        # target of its own, not set aside.
        self._set_aside: dict[tuple[str, int, bool], tuple[float, float]] = {}
        if register:
            with setup_lock(audit_log.database):
                self.tracking = audit_log.factory.tracking_recorder()
                self.setup()

    # -- registry ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Create the registry; register new projections; start builds for raised versions."""
        with self.db.transaction() as cursor:
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {self.db.table('projection_registry')} ("
                " name TEXT PRIMARY KEY, version INTEGER NOT NULL, generation INTEGER NOT NULL,"
                " building_version INTEGER, building_generation INTEGER)"
            )
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {self.db.table('projection_errors')} ("
                " name TEXT NOT NULL, generation INTEGER NOT NULL, position BIGINT NOT NULL,"
                " event_id TEXT, error TEXT NOT NULL, PRIMARY KEY (name, generation, position))"
            )
        for projection in self.projections.values():
            self._register(projection)
        self._drop_retired()  # a switch's, if its process ended before it had dropped them

    def _register(self, projection: Projection) -> Registration:
        """Register a projection new to the store, or start the build of its version if the
        store's is older; returns its registration as it then stands."""
        with self._stepping() as cursor:
            registration = self._registration(cursor, projection.name, lock=True)
            if registration is None:
                self._create_generation(cursor, projection, 1, live=True)
                cursor.execute(
                    self.db.sql(
                        f"INSERT INTO {self.db.table('projection_registry')}"
                        " (name, version, generation) VALUES (%s, %s, 1)"
                    ),
                    [projection.name, projection.version],
                )
            elif _needs_build(projection, registration):
                self._start_build(cursor, projection, registration)
            found = self._registration(cursor, projection.name)
            assert found is not None
            return found

    def _registration(
        self, cursor: Cursor, name: str, *, lock: bool = False
    ) -> Registration | None:
        suffix = " FOR UPDATE" if lock and self.db.dialect == "postgresql" else ""
        cursor.execute(
            self.db.sql(
                "SELECT name, version, generation, building_version, building_generation"
                f" FROM {self.db.table('projection_registry')} WHERE name = %s{suffix}"
            ),
            [name],
        )
        row = cursor.fetchone()
        if row is None:
            return None
        return Registration(
            row["name"],
            row["version"],
            row["generation"],
            row["building_version"],
            row["building_generation"],
        )

    def registration(self, name: str) -> Registration:
        with self.db.reader() as cursor:
            found = self._registration(cursor, name)
        if found is None:
            raise UnknownProjection(name)
        return found

    def _create_generation(
        self, cursor: Cursor, projection: Projection, generation: int, *, live: bool
    ) -> None:
        tables = Tables(self.db, projection.name, generation)
        self._drop_tables(cursor, tables)  # a build left part-way under this number
        statements = projection.schema(tables, self.db)
        if live:  # serving reads from the start; a build gets its read indexes at the switch
            statements += projection.read_indexes(tables)
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(
            self.db.sql(f"DELETE FROM {self._tracking()} WHERE application_name = %s"),
            [tracking_key(projection.name, generation)],
        )
        self.tracking._insert_tracking(
            cursor, Tracking(tracking_key(projection.name, generation), 0)
        )

    def _start_build(
        self, cursor: Cursor, projection: Projection, registration: Registration
    ) -> int:
        generation = max(registration.generation, registration.building_generation or 0) + 1
        if registration.building_generation is not None:
            # A follower may be stepping that build: wait for its step (which holds the tracking
            # row) before taking its tables, in the order a step takes them. Dropping them first
            # deadlocked with a step that had written some and went on to the others.
            key = tracking_key(projection.name, registration.building_generation)
            tracked_position(self.db, cursor, key, lock=True)
            # Renamed here, and dropped with what the switch retires (`_drop_retired`): on
            # SQLite, dropping a large build here held the lock webhooks wait for, for seconds.
            self._retire_generation(cursor, projection, registration.building_generation)
        self._create_generation(cursor, projection, generation, live=False)
        cursor.execute(
            self.db.sql(
                f"UPDATE {self.db.table('projection_registry')}"
                " SET building_version = %s, building_generation = %s WHERE name = %s"
            ),
            [projection.version, generation, projection.name],
        )
        log.info(
            "projection %s: building generation %d (v%d)",
            projection.name,
            generation,
            projection.version,
        )
        return generation

    def _drop_tables(self, cursor: Cursor, tables: Tables) -> None:
        """Every table of a generation, not only those this version makes: the generation may
        be another version's, with tables this one no longer has (or does not know yet)."""
        for name in self.db.table_names(cursor, tables.prefix):
            cursor.execute(f"DROP TABLE IF EXISTS {self.db.table(name)}")

    @contextmanager
    def _stepping(self, *, wait_for_flush: bool = True) -> Iterator[Cursor]:
        """A transaction of the projector's that writes (a step, the start of a build, a switch,
        its index builds and drops): on SQLite, webhook appends waiting for the write lock go
        first (`Db.stepping`)."""
        with self.db.stepping(), self.db.transaction(wait_for_flush=wait_for_flush) as cursor:
            yield cursor

    def _tracking(self) -> str:
        return self.db.table(self.db.tracking_table)

    # -- applying events -------------------------------------------------------------------

    def step(self, projection: Projection, generation: int, limit: int | None = None) -> int:
        """Apply the next batch to one generation, exactly once. Returns events read.

        The batch is first applied in one go. If any event in it fails, that transaction is
        rolled back whole and the batch is applied again event by event under savepoints, so the
        poison event is recorded and skipped and the rest apply: the common case pays no
        per-event savepoint round trips.
        """
        try:
            return self._step(projection, generation, limit, careful=False)
        except _PoisonInBatch:
            return self._step(projection, generation, limit, careful=True)

    def _step(
        self, projection: Projection, generation: int, limit: int | None, *, careful: bool
    ) -> int:
        tables = Tables(self.db, projection.name, generation)
        key = tracking_key(projection.name, generation)
        # A step's rows commit with its position: a step lost in a crash is applied again.
        with self._stepping(wait_for_flush=False) as cursor:
            cursor.execute(self.db.sql(tracked_position_query(self.db, lock=True)), [key])
            found = cursor.fetchone()
            if found is None:
                return 0  # this generation was switched away or dropped meanwhile
            position = found["notification_id"]
            rows = self._read_after(cursor, position, limit or self.batch_size)
            deliveries = [row for row in rows if row["topic"] != MARKER_TOPIC]
            if careful:
                for row in deliveries:
                    self._apply_guarded(cursor, projection, tables, generation, row)
            else:
                writer = self.db.text_safe(cursor)
                try:
                    events = [self.decode(row) for row in deliveries]
                    projection.apply(writer, tables, self.db, events)
                except Exception as exc:
                    if is_database_failure(exc):
                        raise  # not the events': the whole step is tried again later
                    raise _PoisonInBatch() from exc
            if rows:
                self.tracking._insert_tracking(cursor, Tracking(key, rows[-1]["position"]))
            return len(rows)

    def _read_after(self, cursor: Cursor, position: int, limit: int) -> list[dict[str, Any]]:
        """The next stored events after `position`, for `decode`.

        Every projection reads the same batches. The first step to reach a batch (nothing after
        `position` decoded yet) fetches its stored events whole; the others fetch positions and
        topics, take the deliveries decoded already, and fetch the stored events of the rest: in
        a rebuild of all three, two reads in three fetch no stored event.
        """
        column = self.db.position_column
        newest_decoded = next(reversed(self._decoded), None)
        first_reader = newest_decoded is None or newest_decoded <= position
        stored = ", originator_id, originator_version, state" if first_reader else ""
        rows = self.db.fetch_payloads(
            cursor,
            f"SELECT {column} AS position, topic{stored}"
            f" FROM {self.db.table(self.db.events_table)}"
            f" WHERE {column} > %s ORDER BY {column} LIMIT %s",
            [position, limit],
        )
        if self.db.dialect == "sqlite":  # sqlite3.Row cannot take the decoded delivery
            rows = [dict(row) for row in rows]
        if first_reader:
            return rows
        missing = []
        for row in rows:
            if row["topic"] == MARKER_TOPIC:
                continue
            decoded = self._decoded.get(row["position"])
            if decoded is None:
                missing.append(row)
            else:
                row["decoded"] = decoded
        if missing:
            self._fetch_stored(cursor, missing)
        return rows

    def _fetch_stored(self, cursor: Cursor, rows: list[dict[str, Any]]) -> None:
        column = self.db.position_column
        found_rows = self.db.fetch_payloads(
            cursor,
            f"SELECT {column} AS position, originator_id, originator_version, state"
            f" FROM {self.db.table(self.db.events_table)}"
            f" WHERE {column} >= %s AND {column} <= %s AND topic <> %s",
            [rows[0]["position"], rows[-1]["position"], MARKER_TOPIC],
        )
        stored = {found["position"]: found for found in found_rows}
        for row in rows:
            found = stored[row["position"]]
            row["originator_id"] = found["originator_id"]
            row["originator_version"] = found["originator_version"]
            row["state"] = found["state"]

    def decode(self, row: dict[str, Any]) -> StoredDelivery:
        """The delivery a row of `_read_after` holds, decoded once for every projection."""
        decoded = row.get("decoded")
        if decoded is not None:
            return decoded
        position = row["position"]
        decoded = StoredDelivery(position=position, delivery=self.log.stored_delivery(row))
        self._decoded[position] = decoded
        while len(self._decoded) > DECODED_CACHE_SIZE:
            self._decoded.popitem(last=False)
        return decoded

    def _apply_guarded(
        self, cursor: Cursor, projection: Projection, tables: Tables, generation: int, row: Any
    ) -> None:
        cursor.execute("SAVEPOINT projection_event")
        event: StoredDelivery | None = None
        try:
            event = self.decode(row)
            projection.apply(self.db.text_safe(cursor), tables, self.db, [event])
        except Exception as exc:  # a poison event: report it, keep going
            if is_database_failure(exc):
                # A lock or statement timeout, a cancelled query, a lost connection: the event
                # is not at fault. Skipped as poison, it would be missing from the read model
                # for good; the whole step is tried again later instead.
                raise
            cursor.execute("ROLLBACK TO SAVEPOINT projection_event")
            event_id = event.delivery.svix_id if event is not None else None
            log.error(
                "projection %s: event at %s (%s) failed: %s",
                projection.name,
                row["position"],
                event_id or "not readable",
                exc,
            )
            cursor.execute(
                self.db.sql(
                    f"INSERT INTO {self.db.table('projection_errors')}"
                    " (name, generation, position, event_id, error) VALUES (%s, %s, %s, %s, %s)"
                ),
                [
                    projection.name,
                    generation,
                    row["position"],
                    event_id,
                    "".join(traceback.format_exception_only(exc)).strip()[:2000],
                ],
            )
        cursor.execute("RELEASE SAVEPOINT projection_event")

    # -- following and building ------------------------------------------------------------

    def run_once(self, *, progress: Callable[[str, int], None] | None = None) -> int:
        """Bring every projection (and every build under way) up to the end of the store."""
        return self.catch_up(*self.projections.values(), progress=progress)

    def catch_up(
        self, *projections: Projection, progress: Callable[[str, int], None] | None = None
    ) -> int:
        """Step the projections in rounds, a batch each, until each comes back short (the end
        of the store at that moment); a build that has caught up then goes live.

        In rounds rather than one after the other: projections at the same position (a rebuild
        of them all) read the same batch, decoded once. (Running a round's steps in threads, so
        that one projection's Python ran while another's statements ran in the server, took
        105 s instead of 112 s at 200,000 events, for 9 s more CPU: `objects` alone is most of
        a round.)

        While a build runs, every live generation is stepped every round too: one of the same
        version if it is ahead of the build (`_targets`), and a build that has gone live, so
        that the reads they serve do not fall behind the store until the last build switches
        (a build of `objects` takes minutes after those of `events` and `timelines`).
        `progress` hears of the builds' steps then, and of every step otherwise.

        A generation whose step or switch fails is left out from then on (and from later
        catch-ups for a while: `RETRY_FIRST_SECONDS`) while the others go on; its error is
        raised at the end, or an ExceptionGroup of several. The database being down is raised
        at once.
        """
        failures: list[Exception] = []
        draining = []
        for projection in projections:
            try:
                targets = self._targets(projection)
            except Exception as exc:
                self._raise_if_down(exc, failures)
                exc.add_note(f"in projection {projection.name}")
                failures.append(exc)
                continue
            known = {(target[0].name, *target[1:]) for target in targets}
            for key in [key for key in self._set_aside if key[0] == projection.name]:
                if key not in known:  # switched, replaced or dropped meanwhile
                    del self._set_aside[key]
            draining += [target for target in targets if self._due(*target)]
        building = {projection.name for projection, _, build in draining if build}
        total = 0
        while draining:
            behind = []
            for projection, generation, build in draining:
                try:
                    count = self.step(projection, generation)
                    total += count
                    if progress and count and (build or not building):
                        progress(projection.name, count)
                    if count < self.batch_size and build:
                        self._switch(projection, generation)
                except Exception as exc:
                    self._raise_if_down(exc, failures)
                    failures.append(self._set_aside_after(exc, projection, generation, build))
                    if build:  # else the followers beside it would never stop
                        building.discard(projection.name)
                    continue
                self._set_aside.pop((projection.name, generation, build), None)
                if count >= self.batch_size:
                    behind.append((projection, generation, build))
                elif build:
                    building.discard(projection.name)
                    behind.append((projection, generation, False))  # live now: following
                elif building:
                    behind.append((projection, generation, build))  # following, beside a build
            draining = behind
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ExceptionGroup("projections failed; the others went on", failures)
        return total

    def _due(self, projection: Projection, generation: int, build: bool) -> bool:
        aside = self._set_aside.get((projection.name, generation, build))
        return aside is None or time.monotonic() >= aside[0]

    def retry_due(self) -> bool:
        """Whether a generation set aside after a failure may be tried again now."""
        now = time.monotonic()
        return any(due <= now for due, _ in self._set_aside.values())

    @staticmethod
    def _raise_if_down(exc: Exception, failures: list[Exception]) -> None:
        """The database is down: every step would fail alike, so the round ends here (the
        failures before it logged, not lost)."""
        if is_store_down(exc):
            for failure in failures:
                log.error(
                    "projection runner: a step failed before the database went down",
                    exc_info=failure,
                )
            raise exc

    def _set_aside_after(
        self, exc: Exception, projection: Projection, generation: int, build: bool
    ) -> Exception:
        key = (projection.name, generation, build)
        previous = self._set_aside.get(key)
        pause = RETRY_FIRST_SECONDS if previous is None else previous[1] * 2
        pause = min(pause, RETRY_MAX_SECONDS)
        self._set_aside[key] = (time.monotonic() + pause, pause)
        exc.add_note(f"in projection {projection.name}, generation {generation}")
        log.warning(
            "projection %s, generation %d: set aside for %g s after a failure; the others go on",
            projection.name,
            generation,
            pause,
        )
        return exc

    def _targets(self, projection: Projection) -> list[tuple[Projection, int, bool]]:
        """The generations to bring up to date, each with whether it is a build: the build of
        this version if one is under way, and the live one if this code knows its version.

        Beside a build, the live generation is stepped only when it is ahead of the build (as
        it is when it has been following the store): one that is not would only repeat the
        build's work, and the build replaces it when it catches up.
        """
        registration = self.registration(projection.name)
        if registration.version < projection.version and registration.building_version is None:
            # Reads were switched to an older version since this process started (another
            # release's `audit rebuild`): build this one again, as at start, rather than stop
            # stepping a generation this code cannot apply. Never while a build is under way:
            # dropping another release's build each round, two releases undid each other's.
            log.warning(
                "projection %s: reads use v%d, older than this release's; building v%d again",
                projection.name,
                registration.version,
                projection.version,
            )
            registration = self._register(projection)
        elif (
            registration.version > projection.version
            and registration.building_version != projection.version
        ):
            self._warn_newer(projection, registration)
        live = (projection, registration.generation, False)
        knows_live = registration.version == projection.version
        if registration.building_generation is None or (
            registration.building_version != projection.version
        ):
            return [live] if knows_live else []
        build = (projection, registration.building_generation, True)
        if not knows_live:
            return [build]
        with self.db.reader() as cursor:
            live_at = tracked_position(self.db, cursor, tracking_key(projection.name, live[1]))
            build_at = tracked_position(self.db, cursor, tracking_key(projection.name, build[1]))
        # Also while the build is set aside after a failure: reads use the live one meanwhile.
        ahead = live_at > build_at or not self._due(*build)
        return [live, build] if ahead else [build]

    def _warn_newer(self, projection: Projection, registration: Registration) -> None:
        """Once per store version: a release older than the store's projection leaves it be."""
        if self._warned_newer.get(projection.name) == registration.version:
            return
        self._warned_newer[projection.name] = registration.version
        log.warning(
            "projection %s: reads use v%d, newer than this release's v%d, which cannot apply"
            " it: they fall behind the store until a release that knows v%d steps them",
            projection.name,
            registration.version,
            projection.version,
            registration.version,
        )

    def _switch(self, projection: Projection, generation: int) -> None:
        """Point reads at a caught-up build, in one transaction, and drop the old tables.

        Only what must be one with the switch is in its transaction. On SQLite each statement
        holds the file's one write lock, and webhooks wait for it: at 100,000 events the
        switch of `objects` held it 4.5 s (building its read indexes 1.9 s, dropping the old
        tables 2.6 s). So the read indexes are built before it and the old tables dropped
        after it, each in a transaction of its own that lets waiting appends go first; the
        switch renames the old tables (`RETIRED`), which is quick.
        """
        if not self._build_read_indexes(projection, generation):
            return
        with self._stepping() as cursor:
            registration = self._registration(cursor, projection.name, lock=True)
            if registration is None or registration.building_generation != generation:
                return
            # Whatever arrived since the build's last step goes in before the switch.
            tables = Tables(self.db, projection.name, generation)
            # Locked: another process may be stepping this build; its batch must commit first,
            # or this would apply the same events again.
            position = tracked_position(
                self.db, cursor, tracking_key(projection.name, generation), lock=True
            )
            rows = self._read_after(cursor, position, 1_000_000_000)
            for row in rows:
                if row["topic"] != MARKER_TOPIC:
                    self._apply_guarded(cursor, projection, tables, generation, row)
            if rows:
                self.tracking._insert_tracking(
                    cursor,
                    Tracking(tracking_key(projection.name, generation), rows[-1]["position"]),
                )
            # A build's tables were filled in bulk: without statistics the planner guesses, and
            # at 1,000,000 events it scanned a whole primary key for `/v1/changes?subject=`
            # (128 ms instead of 0.4). Autovacuum would get there, later, if it is on.
            for name in projection.table_names:
                self.db.analyze(cursor, tables[name])
            self._retire_generation(cursor, projection, registration.generation)
            cursor.execute(
                self.db.sql(
                    f"UPDATE {self.db.table('projection_registry')} SET version = %s,"
                    " generation = %s, building_version = NULL, building_generation = NULL"
                    " WHERE name = %s"
                ),
                [registration.building_version, generation, projection.name],
            )
        log.info("projection %s: reads switched to generation %d", projection.name, generation)
        try:
            self._drop_retired(projection.name)
        except Exception:  # switched all the same: `run_forever` and `setup` drop them later
            log.warning(
                "projection %s: retired tables not dropped yet", projection.name, exc_info=True
            )

    def _build_read_indexes(self, projection: Projection, generation: int) -> bool:
        """The build's read indexes, each in a transaction of its own; False if it is no longer
        the build (switched or replaced meanwhile by another process)."""
        tables = Tables(self.db, projection.name, generation)
        for statement in projection.read_indexes(tables):
            with self._stepping() as cursor:
                registration = self._registration(cursor, projection.name, lock=True)
                if registration is None or registration.building_generation != generation:
                    return False
                cursor.execute(statement)
        return True

    def _retire_generation(self, cursor: Cursor, projection: Projection, generation: int) -> None:
        """Rename a generation's tables out of reads' way (a read that still names them finds
        them missing, and looks up the live generation again) for `_drop_retired`."""
        # Its tracking row first: a follower's step of it holds that row, then writes the
        # tables; renaming them first deadlocked with a step that had written only some.
        cursor.execute(
            self.db.sql(f"DELETE FROM {self._tracking()} WHERE application_name = %s"),
            [tracking_key(projection.name, generation)],
        )
        prefix = Tables(self.db, projection.name, generation).prefix
        for name in self.db.table_names(cursor, prefix):
            # The new name unqualified: PostgreSQL keeps a table in its schema.
            cursor.execute(f'ALTER TABLE {self.db.table(name)} RENAME TO "{RETIRED}{name}"')

    def _drop_retired(self, name: str | None = None) -> None:
        """Drop retired tables (of one projection, or all), each in a transaction of its own.
        Those a stopped process left are dropped at the next `setup`, and by `run_forever`."""
        prefix = RETIRED + (f"p_{name}_" if name else "")
        with self.db.reader() as cursor:
            retired = self.db.table_names(cursor, prefix)
        for table in retired:
            with self._stepping() as cursor:
                cursor.execute(f"DROP TABLE IF EXISTS {self.db.table(table)}")

    def rebuild(self, name: str, *, downgrade: bool = False) -> int:
        """Start a fresh build of `name` beside the live one (caught up by `run_once`).

        Refused (NewerVersion) when reads use a newer version than this release's, unless
        `downgrade`: the build would switch the releases that know that version to one they
        do not step (a rolling deploy's old release, run by mistake)."""
        projection = self.projections.get(name)
        if projection is None:
            raise UnknownProjection(name)
        with self._stepping() as cursor:
            registration = self._registration(cursor, name, lock=True)
            assert registration is not None
            if not downgrade:
                _refuse_downgrade(projection, registration)
            return self._start_build(cursor, projection, registration)

    def check_rebuild(self, name: str) -> None:
        """Raise NewerVersion if `rebuild(name)` would be refused (before starting any)."""
        _refuse_downgrade(self.projections[name], self.registration(name))

    def run_forever(
        self,
        stop: threading.Event,
        *,
        poll_seconds: float = 0.5,
        recheck_seconds: float = RECHECK_SECONDS,
    ) -> None:
        """Follow the store until `stop` is set: LISTEN/NOTIFY on PostgreSQL, polling always.
        During a burst of deliveries the catching up waits a little (FollowingPace)."""
        waiter = EventWaiter(self.log.database, self.db.events_table.replace(".", "_"))
        caught_up_to: int | None = None
        caught_up_at = swept_at = time.monotonic()
        pace = FollowingPace()
        try:
            while not stop.is_set():
                try:
                    # One cheap query instead of a locking transaction per projection when
                    # nothing has arrived since the last catch-up.
                    head = self.log.recorder.max_notification_id()
                    now = time.monotonic()
                    if now - swept_at >= recheck_seconds:
                        # Tables a switch retired but did not drop (its process was stopped
                        # in between: Ctrl-C on `audit rebuild`): this process runs for weeks.
                        self._drop_retired()
                        swept_at = now
                    if (
                        head != caught_up_to
                        or now - caught_up_at >= recheck_seconds
                        or self.retry_due()  # a generation set aside after a failure
                    ):
                        pause = pace.wait_before_catching_up(now, head or 0)
                        if pause:
                            stop.wait(pause)
                            continue
                        applied = self.run_once()
                        pace.caught_up()
                        caught_up_to, caught_up_at = head, time.monotonic()
                        if applied < self.batch_size:
                            # A trickle, not a backlog: let the next burst gather, so that it
                            # is applied as one batch rather than event by event.
                            stop.wait(COALESCE_SECONDS)
                        continue
                except Exception as exc:  # the database went away, or a build raced: retry
                    reason = unavailable_reason(exc)
                    if reason is None:
                        log.exception("projection runner: step failed; retrying")
                    else:  # a line a retry, not a hundred: an outage is not a bug
                        log.warning(
                            "projection runner: database unavailable (%s); retrying", reason
                        )
                    stop.wait(poll_seconds)
                    continue
                waiter(stop, poll_seconds)
        finally:
            waiter.close()

    # -- status ------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        with self.db.reader() as cursor:
            if "projection_registry" not in self.db.table_names(cursor):
                return rows  # never projected (a store only written to, so far)
            for projection in self.projections.values():
                registration = self._registration(cursor, projection.name)
                if registration is None:
                    continue
                building = registration.building_generation is not None
                generation = (
                    registration.building_generation if building else registration.generation
                )
                assert generation is not None
                position = tracked_position(
                    self.db, cursor, tracking_key(projection.name, generation)
                )
                lag = self._deliveries_between(cursor, position)
                cursor.execute(
                    self.db.sql(
                        f"SELECT COUNT(*) AS errors FROM {self.db.table('projection_errors')}"
                        " WHERE name = %s AND generation = %s"
                    ),
                    [projection.name, generation],
                )
                errors = cursor.fetchone()["errors"]
                # What reads use meanwhile: a monitor of lag should not see a build's as theirs.
                serving_position, serving_lag = position, lag
                if building:
                    live = tracking_key(projection.name, registration.generation)
                    serving_position = tracked_position(self.db, cursor, live)
                    serving_lag = self._deliveries_between(cursor, serving_position)
                rows.append(
                    {
                        "name": projection.name,
                        "version": registration.building_version
                        if building
                        else registration.version,
                        "position": position,
                        "lag": lag,
                        "state": "rebuilding" if building else "live",
                        "errors": errors,
                        "serving_version": registration.version,
                        "serving_position": serving_position,
                        "serving_lag": serving_lag,
                    }
                )
        return rows

    def deliveries_between(self, after: int, upto: int) -> int:
        """How many deliveries the store holds after position `after`, up to `upto`."""
        with self.db.reader() as cursor:
            return self._deliveries_between(cursor, after, upto)

    def _deliveries_between(self, cursor: Cursor, after: int, upto: int | None = None) -> int:
        column = self.db.position_column
        bound = "" if upto is None else f" AND {column} <= %s"
        cursor.execute(
            self.db.sql(
                f"SELECT COUNT(*) AS deliveries FROM {self.db.table(self.db.events_table)}"
                f" WHERE {column} > %s{bound} AND topic <> %s"
            ),
            [after, *([] if upto is None else [upto]), MARKER_TOPIC],
        )
        return cursor.fetchone()["deliveries"]


def failure_text(exc: BaseException) -> str:
    """What to tell a person of a catch-up that failed: one line for the database failing (a
    retry may succeed), the whole traceback for anything else."""
    reason = unavailable_reason(exc)
    if reason is not None:
        return f"the database could not be used: {reason}"
    return "".join(traceback.format_exception(exc)).rstrip()


def _needs_build(projection: Projection, registration: Registration) -> bool:
    """At start: whether reads use an older version than `projection`'s and no build of it, or
    of a newer one, is under way (an older one's is taken over, as one left part-way)."""
    return registration.version < projection.version and (
        registration.building_version is None or registration.building_version < projection.version
    )


def _refuse_downgrade(projection: Projection, registration: Registration) -> None:
    """A rebuild would drop a newer version's live tables, or its build under way."""
    newest = max(registration.version, registration.building_version or 0)
    if newest > projection.version:
        raise NewerVersion(projection.name, newest, projection.version)


def tracking_key(name: str, generation: int) -> str:
    return f"projection:{name}:g{generation}"


def active_tables(db: Db, name: str) -> Tables:
    """The tables reads should use for projection `name` right now."""
    row = db.fetchone(
        f"SELECT generation, version FROM {db.table('projection_registry')} WHERE name = %s",
        (name,),
    )
    if row is None:
        raise UnknownProjection(name)
    return Tables(db, name, row["generation"], row["version"])


@dataclass(frozen=True)
class Behind:
    """The generation reads of a projection use has applied the store up to `applied` of
    `stored` (positions); `building`: the version being built meanwhile, if any."""

    applied: int
    stored: int
    building: int | None


def reads_behind(db: Db, name: str) -> Behind | None:
    """How far the reads of projection `name` are behind the store, or None if they are not."""
    with db.reader() as cursor:
        cursor.execute(
            db.sql(
                "SELECT generation, building_version"
                f" FROM {db.table('projection_registry')} WHERE name = %s"
            ),
            [name],
        )
        row = cursor.fetchone()
        if row is None:
            raise UnknownProjection(name)
        applied = tracked_position(db, cursor, tracking_key(name, row["generation"]))
        cursor.execute(
            f"SELECT MAX({db.position_column}) AS stored FROM {db.table(db.events_table)}"
        )
        stored = cursor.fetchone()["stored"] or 0
    return Behind(applied, stored, row["building_version"]) if applied < stored else None


def tracked_position_query(db: Db, *, lock: bool = False) -> str:
    """The SELECT of the last store position a generation (`tracking_key`, the one parameter)
    has applied; `lock` holds its row (PostgreSQL) until the transaction ends."""
    suffix = " FOR UPDATE" if lock and db.dialect == "postgresql" else ""
    return (
        f"SELECT notification_id FROM {db.table(db.tracking_table)}"
        f" WHERE application_name = %s{suffix}"
    )


def tracked_position(db: Db, cursor: Cursor, key: str, *, lock: bool = False) -> int:
    """The last store position a projection's generation (`tracking_key`) has applied."""
    cursor.execute(db.sql(tracked_position_query(db, lock=lock)), [key])
    row = cursor.fetchone()
    return row["notification_id"] if row else 0
