"""Fill a store with N realistic deliveries for the benchmarks.

    world = World(200_000, seed=1)
    bulk_load(log, world)            # PostgreSQL: COPY of the rows `AuditLog.record` writes
    fill(log, 200_000)               # or: `AuditLog.record` in batches of 500 (any backend)
    project_parallel(url, [["objects"], ["events", "timelines"]])   # or project(log)

Deliveries are the bundled samples (`audit/samples/*.json`) with fresh Clerk ids and times:

- users (about N/20) are created, then updated several times, each update changing one to three
  of `first_name`, `last_name`, `username`, `public_metadata.department`, `image_url`; about 1%
  of the updates are deletions;
- sessions of those users are created, then end (ended, revoked, removed; sometimes pending);
- organizations are created and updated; memberships (of created users in created
  organizations) are created, updated, deleted; invitations are created then accepted or revoked;
  domains are created, updated, deleted;
- e-mails and SMS name created users; roles, permissions, billing and waitlist events are kept as
  other subjects;
- each delivery's client IP is drawn (`World.client_ip`), mostly IPv4, some IPv6;
- occurred_at advances one second per delivery; a `late` share arrives up to 100 deliveries after
  its place (delivery order is not event order).

`World` also lists what it created (`users`, `sessions`, `orgs`, `user_span`) for benchmarks that
want ids to ask about."""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from audit.aggregates.delivery import Delivery
from audit.aggregates.routing import (
    delivery_marker_id,
    needs_owner_lookup,
    organization_id_of,
    owning_stream,
)
from audit.aggregates.streams import marker_event, recorded_event
from audit.application import SUB_OBJECTS_WITH_STUBS, AuditLog
from audit.config import PostgresDatabase, parse_database_url
from audit.projections.runner import Projector, all_projections
from audit.samples import sample_bodies
from audit.storage import events_table_name, postgres_connect_args

ID_IN_TEXT = re.compile(r'"(([a-z]+(?:_[a-z]+)*)_[A-Za-z0-9]{27})"')
T0_MS = 1_716_883_200_000  # 2024-05-28, the samples' era
STEP_MS = 1_000
LATE_WINDOW = 100
RECORD_BATCH = 500

FAMILIES = {  # share of deliveries
    "user": 25,
    "session": 35,
    "email": 8,
    "sms": 2,
    "organization": 5,
    "organizationMembership": 10,
    "organizationInvitation": 4,
    "organizationDomain": 2,
    "other": 4,
}
OTHER_PREFIXES = ("role.", "permission.", "subscription", "paymentAttempt.", "waitlistEntry.")
FIRST_NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia"]
LAST_NAMES = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Perlman"]
DEPARTMENTS = ["engineering", "sales", "support", "finance", "legal", "research"]


@dataclass
class Slot:
    id: str
    created: bool = False
    user: str | None = None
    org: str | None = None


@dataclass
class World:
    """The generator, and what it generated that a benchmark may want to ask about."""

    events: int
    seed: int = 1
    late: float = 0.01
    rng: random.Random = field(init=False)
    # The actors' addresses, drawn apart so that the rest of the world is what it was before.
    address_rng: random.Random = field(init=False)
    users: list[str] = field(default_factory=list)  # every created user
    sessions: list[str] = field(default_factory=list)  # every created session
    orgs: list[str] = field(default_factory=list)  # every created organization
    user_span: dict[str, tuple[int, int]] = field(default_factory=dict)  # first, last occurred

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.address_rng = random.Random(-self.seed)
        # Each sample as its text split around its Clerk ids: [text, id, text, id, ..., text].
        self.parts: dict[str, list[str]] = {}
        self.roles: dict[str, dict[str, str]] = {}
        for event_type, body in sample_bodies():
            envelope = json.loads(body)
            text = json.dumps(envelope, separators=(",", ":"))
            self.parts[event_type] = ID_IN_TEXT.split(text)
            self.roles[event_type] = _roles(envelope["data"])
        self.others = sorted(t for t in self.parts if t.startswith(OTHER_PREFIXES))
        n = self.events
        self.pools = {
            "user": self._pool("user", n // 20),
            "session": self._pool("sess", n // 40),
            "organization": self._pool("org", n // 400),
            "organizationMembership": self._pool("orgmem", n // 40),
            "organizationInvitation": self._pool("orginv", n // 100),
            "organizationDomain": self._pool("orgdmn", n // 400),
        }
        self.families = list(FAMILIES)
        self.weights = list(FAMILIES.values())

    def _pool(self, prefix: str, size: int) -> list[Slot]:
        return [Slot(self.fresh(prefix)) for _ in range(max(2, size))]

    def fresh(self, prefix: str) -> str:
        """A fresh Clerk-shaped id: 27 random characters (hex digits, a subset of base62)."""
        return f"{prefix}_{self.rng.getrandbits(108):027x}"

    def _created(self, kind: str) -> str:
        """A created user or organization (a new one is created first if there is none)."""
        known = self.users if kind == "user" else self.orgs
        if known:
            return known[self.rng.randrange(len(known))]
        return self.pools[kind][0].id

    # -- one delivery's envelope -------------------------------------------------------------

    def render(self, event_type: str, slot: Slot | None) -> dict[str, Any]:
        """The sample with its subject, user and organization ids replaced by `slot`'s; other
        users and organizations from the created ones; every other id fresh."""
        mapping: dict[str, str] = {}
        roles = self.roles[event_type]
        if slot is not None:
            for role, value in (("subject", slot.id), ("user", slot.user), ("org", slot.org)):
                if role in roles and value is not None:
                    mapping[roles[role]] = value

        parts = self.parts[event_type]
        out = [parts[0]]
        for i in range(1, len(parts), 3):  # split() gives (id, prefix, text) after the first text
            original, prefix = parts[i], parts[i + 1]
            new = mapping.get(original)
            if new is None:
                if prefix == "ins":
                    new = original  # one instance sends everything
                elif prefix in ("user", "org"):
                    new = self._created("user" if prefix == "user" else "organization")
                else:
                    new = self.fresh(prefix)
                mapping[original] = new
            out += ('"', new, '"', parts[i + 2])
        return json.loads("".join(out))

    def _lifecycle(
        self, family: str, now: int, later: dict[str, int], terminal: tuple[str, ...]
    ) -> tuple[dict[str, Any], Slot, str]:
        pool = self.pools[family]
        index = self.rng.randrange(len(pool))
        slot = pool[index]
        if not slot.created:
            event_type = f"{family}.created"
            slot.created = True
            slot.user = slot.user or self._created("user")
            slot.org = slot.org or self._created("organization")
        else:
            event_type = self.rng.choices(list(later), list(later.values()))[0]
        envelope = self.render(event_type, slot)
        data = envelope["data"]
        if not data.get("deleted"):
            if "created_at" in data and event_type.endswith(".created"):
                data["created_at"] = now
            if "updated_at" in data:
                data["updated_at"] = now
        if event_type.endswith(terminal):
            prefix = slot.id.split("_", 1)[0]
            pool[index] = Slot(self.fresh(prefix))
        return envelope, slot, event_type

    def _user(self, now: int) -> dict[str, Any]:
        later = {"user.updated": 99, "user.deleted": 1}
        envelope, slot, event_type = self._lifecycle("user", now, later, (".deleted",))
        data, rng = envelope["data"], self.rng
        if event_type == "user.created":
            self.users.append(slot.id)
            data["first_name"] = rng.choice(FIRST_NAMES)
            data["last_name"] = rng.choice(LAST_NAMES)
            data["username"] = f"u{rng.randrange(10**9)}"
        elif event_type == "user.updated":
            data["last_sign_in_at"] = data["last_active_at"] = now - rng.randrange(86_400_000)
            fields = ["first_name", "last_name", "username", "dept", "image"]
            for name in rng.sample(fields, rng.randint(1, 3)):
                if name == "first_name":
                    data["first_name"] = rng.choice(FIRST_NAMES)
                elif name == "last_name":
                    data["last_name"] = rng.choice(LAST_NAMES)
                elif name == "username":
                    data["username"] = f"u{rng.randrange(10**9)}"
                elif name == "dept":
                    data["public_metadata"] = {"department": rng.choice(DEPARTMENTS)}
                else:
                    data["image_url"] = f"https://img.clerk.com/{rng.randrange(10**9)}"
        first, _ = self.user_span.get(slot.id, (now, now))
        self.user_span[slot.id] = (first, now)
        return envelope

    def _session(self, now: int) -> dict[str, Any]:
        later = {"session.ended": 5, "session.revoked": 2, "session.removed": 2}
        later["session.pending"] = 2
        terminal = (".ended", ".revoked", ".removed")
        envelope, slot, event_type = self._lifecycle("session", now, later, terminal)
        if event_type == "session.created":
            self.sessions.append(slot.id)
        data = envelope["data"]
        data["last_active_at"] = now
        data["expire_at"] = now + 7 * 86_400_000
        if isinstance(data.get("latest_activity"), dict):
            data["latest_activity"]["ip_address"] = f"10.0.{self.rng.randrange(256)}.1"
        return envelope

    def _organization(self, now: int) -> dict[str, Any]:
        later = {"organization.updated": 98, "organization.deleted": 2}
        envelope, slot, event_type = self._lifecycle("organization", now, later, (".deleted",))
        data = envelope["data"]
        if event_type == "organization.created":
            self.orgs.append(slot.id)
        if event_type != "organization.deleted":
            name = f"{self.rng.choice(LAST_NAMES)} {self.rng.randrange(10**6)}"
            data["name"] = name
            data["slug"] = name.lower().replace(" ", "-")
            data["members_count"] = self.rng.randrange(1, 500)
        return envelope

    def _organizationMembership(self, now: int) -> dict[str, Any]:
        later = {"organizationMembership.updated": 8, "organizationMembership.deleted": 2}
        envelope, _, _ = self._lifecycle("organizationMembership", now, later, (".deleted",))
        envelope["data"]["role"] = self.rng.choice(["org:admin", "org:member", "org:billing"])
        return envelope

    def _organizationInvitation(self, now: int) -> dict[str, Any]:
        later = {"organizationInvitation.accepted": 6, "organizationInvitation.revoked": 4}
        terminal = (".accepted", ".revoked")
        return self._lifecycle("organizationInvitation", now, later, terminal)[0]

    def _organizationDomain(self, now: int) -> dict[str, Any]:
        later = {"organizationDomain.updated": 8, "organizationDomain.deleted": 2}
        return self._lifecycle("organizationDomain", now, later, (".deleted",))[0]

    def _email(self, now: int) -> dict[str, Any]:
        return self.render("email.created", None)

    def _sms(self, now: int) -> dict[str, Any]:
        return self.render("sms.created", None)

    def _other(self, now: int) -> dict[str, Any]:
        return self.render(self.rng.choice(self.others), None)

    def envelope(self, now: int) -> dict[str, Any]:
        family = self.rng.choices(self.families, self.weights)[0]
        envelope = getattr(self, f"_{family}")(now)
        envelope["timestamp"] = now
        request = (envelope.get("event_attributes") or {}).get("http_request")
        if isinstance(request, dict):
            request["client_ip"] = self.client_ip()
        return envelope

    def client_ip(self) -> str:
        """Nine in ten from `10.0.0.0/8` (about 14 a `/24` and 3,500 a `/16` at 1,000,000),
        the rest IPv6 from `2001:db8::/32`, one in a hundred of those mapped IPv4
        (`::ffff:10.a.b.c`)."""
        rng = self.address_rng
        if rng.random() < 0.9:
            return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if rng.random() < 0.01:
            return f"::ffff:10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        return f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}"

    # -- the deliveries ----------------------------------------------------------------------

    def deliveries(self) -> Iterator[Delivery]:
        """`events` deliveries in arrival order."""
        held: list[tuple[int, int, bytes]] = []
        arrived = 0

        def arrive(envelope: dict[str, Any]) -> Delivery:
            """What `parse_delivery` makes of the body (without parsing it back)."""
            nonlocal arrived
            received_at = T0_MS + arrived * STEP_MS + self.rng.randrange(STEP_MS)
            arrived += 1
            text = json.dumps(envelope, separators=(",", ":"))
            return Delivery(
                svix_id=self.fresh("msg"),
                svix_timestamp=received_at // 1000,
                type=envelope["type"],
                occurred_at=envelope["timestamp"],
                instance_id=envelope.get("instance_id"),
                event_attributes=envelope.get("event_attributes"),
                received_at=received_at,
                body=text,
                sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                data=envelope["data"],
            )

        for index in range(self.events):
            envelope = self.envelope(T0_MS + index * STEP_MS)
            if self.rng.random() < self.late:
                release = index + self.rng.randrange(1, LATE_WINDOW)
                heapq.heappush(held, (release, index, envelope))
            else:
                yield arrive(envelope)
            while held and held[0][0] <= index:
                yield arrive(heapq.heappop(held)[2])
        while held:
            yield arrive(heapq.heappop(held)[2])


def _roles(data: dict[str, Any]) -> dict[str, str]:
    """The sample's own ids for its subject, its user and its organization."""
    public_user = data.get("public_user_data") or {}
    organization = data.get("organization") or {}
    found = {
        "subject": data.get("id"),
        "user": data.get("user_id") or public_user.get("user_id"),
        "org": data.get("organization_id") or organization.get("id"),
    }
    return {role: value for role, value in found.items() if isinstance(value, str)}


def stored_rows(
    log: AuditLog, deliveries: Iterable[Delivery], owners: dict[str, str]
) -> Iterator[tuple[Any, int, str, bytes]]:
    """(originator_id, version, topic, state) of each stored event, in the order and at the
    versions `AuditLog.record` writes them when deliveries arrive one at a time: the delivery at
    its stream's next version, then its marker. `owners` collects the owner index `record` keeps
    for deletion stubs. (Checked: byte-identical to `fill(..., batch=1)` for 3,000 deliveries.
    `record` of a larger batch can differ: a deletion stub whose object was first seen in the
    same batch finds no owner yet, since the owner index is written after the append, and keeps
    a stream of its own.)"""
    versions: dict[Any, int] = {}
    to_stored = log.mapper.to_stored_event
    for delivery in deliveries:
        known_owner = None
        if needs_owner_lookup(delivery.type, delivery.data):
            known_owner = owners.get(delivery.subject_id or "")
        ref = owning_stream(delivery.type, delivery.data, delivery.svix_id, known_owner)
        stream = ref.stream_id
        version = versions.get(stream, 0) + 1
        versions[stream] = version
        for event in (
            recorded_event(ref.kind, stream, version, delivery),
            marker_event(delivery_marker_id(delivery.svix_id), delivery, stream, version),
        ):
            stored = to_stored(event)
            yield stored.originator_id, stored.originator_version, stored.topic, stored.state
        if delivery.type.startswith(SUB_OBJECTS_WITH_STUBS) and delivery.subject_id:
            organization = organization_id_of(delivery.type, delivery.data)
            if organization:
                owners.setdefault(delivery.subject_id, organization)


def bulk_load(log: AuditLog, world: World) -> int:
    """Bulk-load the world's deliveries into an empty store; returns the rows stored.

    The same rows `record` writes (see `stored_rows`), in one transaction: `COPY` on PostgreSQL,
    one `executemany` on SQLite. Then (VACUUM) ANALYZE, which is what autovacuum would have done
    to a store this size by the time it is queried.
    """
    owners: dict[str, str] = {}
    rows = stored_rows(log, world.deliveries(), owners)
    database = log.database
    if isinstance(database, PostgresDatabase):
        return _copy_postgres(database, rows, owners)
    return _insert_sqlite(str(database.path), rows, owners)


def _copy_postgres(
    database: PostgresDatabase, rows: Iterable[tuple[Any, int, str, bytes]], owners: dict[str, str]
) -> int:
    schema = sql.Identifier(database.schema)
    table = sql.Identifier(events_table_name("postgresql"))
    count = 0
    with psycopg.connect(**postgres_connect_args(database)) as conn:
        with conn.cursor() as cursor:
            statement = sql.SQL(
                "COPY {}.{} (originator_id, originator_version, topic, state)"
                " FROM STDIN (FORMAT BINARY)"
            ).format(schema, table)
            with cursor.copy(statement) as copy:
                copy.set_types(["uuid", "int8", "text", "bytea"])
                for row in rows:
                    copy.write_row(row)
                    count += 1
            cursor.executemany(
                sql.SQL(
                    "INSERT INTO {}.owner_index (object_id, organization_id) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING"
                ).format(schema),
                list(owners.items()),
            )
        conn.commit()
        conn.autocommit = True
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}.{}").format(schema, table))
    return count


def _insert_sqlite(
    path: str, rows: Iterable[tuple[Any, int, str, bytes]], owners: dict[str, str]
) -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.executemany(
            "INSERT INTO stored_events (originator_id, originator_version, topic, state)"
            " VALUES (?, ?, ?, ?)",
            ((o.hex, v, t, s) for o, v, t, s in rows),
        )
        count = cursor.rowcount
        conn.executemany(
            "INSERT INTO owner_index (object_id, organization_id) VALUES (?, ?)"
            " ON CONFLICT DO NOTHING",
            list(owners.items()),
        )
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return count


def fill(
    log: AuditLog,
    events: int,
    *,
    seed: int = 1,
    late: float = 0.01,
    batch: int = RECORD_BATCH,
    progress: Callable[[int, float], None] | None = None,
) -> World:
    """Record `events` generated deliveries through `AuditLog.record`, `batch` at a time."""
    world = World(events, seed, late)
    pending: list[Delivery] = []
    done = 0
    started = time.perf_counter()
    for delivery in world.deliveries():
        pending.append(delivery)
        if len(pending) == batch:
            log.record(pending)
            done += len(pending)
            pending = []
            if progress is not None and done % (50 * batch) == 0:
                progress(done, time.perf_counter() - started)
    if pending:
        log.record(pending)
    return world


def project(log: AuditLog, progress: Callable[[str, int], None] | None = None) -> int:
    """Bring every projection up to the end of the store, one after the other, in this process;
    returns the events applied."""
    return Projector(log).run_once(progress=progress)


def _project_some(url: str, names: list[str]) -> int:
    log = AuditLog(parse_database_url(url))
    try:
        projections = [p for p in all_projections() if p.name in names]
        return Projector(log, projections).run_once()
    finally:
        log.close()


def project_parallel(url: str, groups: Sequence[Sequence[str]]) -> int:
    """Bring projections up to date with one process per group of projection names (each runs
    the service's own `Projector.run_once` over its group); returns the events read."""
    AuditLog(parse_database_url(url)).close()  # create the store's tables once, up front
    log = AuditLog(parse_database_url(url))
    try:
        Projector(log)  # register every projection (creates generation 1) before forking
    finally:
        log.close()
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(groups)) as pool:
        return sum(pool.starmap(_project_some, [(url, list(g)) for g in groups]))
