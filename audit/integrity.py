"""Checking the event store itself (`audit verify`): is every stored delivery what its body says?

The triggers keep the events table from being changed through the database, but whoever can
drop them (a database owner, a restore from an edited dump, a disk that flips a bit) can change
an event. This walk finds what such a change leaves behind:

- a delivery whose body no longer has the SHA-256 recorded with it, or whose other stored
  fields (its type, occurrence time, instance, request attributes) are not what its body says;
- a delivery without its marker, a marker without its delivery, or the two disagreeing on the
  svix-id or the digest;
- a stream whose versions do not run 1, 2, ... n: an event deleted from inside it;
- a delivery without a signature header after one that kept it (class version 3 on);
- given the signing secrets, a delivery whose stored signature header is not one that any of
  them makes for its svix-id, timestamp and body.

The last is what finds a rewrite that kept everything else consistent: nothing in the store
can make a signature without a secret the store does not hold. Deliveries before the first
that kept a signature (older releases') are counted, not reported.

What those checks cannot see is a stream's last events deleted together with their markers. The
*seal* covers that: a SHA-256 over every stored record (its position, stream, version, class
and stored bytes, as stored) in position order, up to the last one read, and that position. A
reviewer keeps it somewhere the store's owner cannot write; a later walk given it (`--sealed
POSITION:SHA256`) says whether the records up to that position are still exactly those,
wherever a change was made. Only what was stored after the last seal kept elsewhere is beyond
it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from svix.webhooks import Webhook

from audit.aggregates.delivery import read_envelope
from audit.aggregates.routing import delivery_marker_id
from audit.aggregates.streams import DeliveryMarker, RecordedDelivery
from audit.application import AuditLog
from audit.timeparse import epoch_ms

BATCH_SIZE = 1000
# Problems kept in the report with their detail; the rest are counted.
MAX_DESCRIBED = 100

# A delivery's place in the store: its stream and version.
_Place = tuple[UUID, int]


# As `audit verify` prints it; "seal: " before it (the printed line, copied whole) is taken too.
_SEAL_TEXT = re.compile(r"(?:seal:\s*)?(0|[1-9][0-9]*):([0-9a-fA-F]{64})", re.ASCII)


@dataclass(frozen=True)
class Seal:
    """The SHA-256 of the store's records up to `position` (and of the position itself, so
    that a seal holds for the position it was made at only), as `audit verify` prints it."""

    position: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.position}:{self.sha256}"

    @classmethod
    def parse(cls, text: str) -> Seal:
        found = _SEAL_TEXT.fullmatch(text.strip())
        if found is None:
            raise ValueError(f"not a seal (POSITION:SHA256, as `audit verify` prints it): {text!r}")
        return cls(int(found[1]), found[2].lower())


@dataclass
class IntegrityReport:
    events: int = 0
    deliveries: int = 0
    markers: int = 0
    streams: int = 0
    signatures_checked: bool = False  # signing secrets were given
    signed: int = 0  # deliveries whose kept signature one of the secrets makes
    unsigned: int = 0  # deliveries before the first that kept a signature (older releases')
    first_signed: int | None = None  # the position of that first one
    seal: Seal | None = None  # the store's, up to the last record read
    seals_held: list[Seal] = field(default_factory=list)  # given seals the store still matches
    # Given seals it does not match, each with what was found: never cut short, as problems are.
    seals_broken: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0 and not self.seals_broken

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_DESCRIBED:
            self.problems.append(text)


@dataclass(frozen=True)
class _Digest:
    """What pairs a delivery with its marker."""

    position: int
    svix_id: str
    sha256: str


def verify_store(
    log: AuditLog,
    *,
    secrets: Sequence[str] = (),
    seals: Sequence[Seal] = (),
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> IntegrityReport:
    """Read every stored event in position order and report what is not as it was recorded;
    with `secrets` (`whsec_...`), check the stored signatures too, and with `seals`, that the
    records up to each one's position are those it sealed. `progress` is called with the
    number of events read in each batch."""
    report = IntegrityReport(signatures_checked=bool(secrets))
    signers = [Webhook(secret) for secret in secrets]
    halves = _Halves(report)
    sealer = _Sealer(report, seals)
    db = log.db
    position = 0
    while True:
        with db.reader() as cursor:
            rows = db.fetch_payloads(
                cursor,
                f"SELECT {db.position_column} AS position, originator_id, originator_version,"
                f" topic, state FROM {db.table(db.events_table)}"
                f" WHERE {db.position_column} > %s ORDER BY {db.position_column} LIMIT %s",
                [position, batch_size],
            )
        for row in rows:
            sealer.add(row)
            _check_event(log, row, report, halves, signers)
        report.events += len(rows)
        if progress is not None:
            progress(len(rows))
        if len(rows) < batch_size:
            break
        position = rows[-1]["position"]
    sealer.finish()
    halves.report_unpaired()
    _check_streams(log, report)
    return report


class _Sealer:
    """The store's seal, made as the walk reads each record, and the given seals compared with
    it when the walk passes their positions.

    Each record is hashed as its columns are stored, not as they are read (a stream id in
    another case is another stream to a reader), each column tagged with its kind and its
    length, so that no two different records, or runs of records, hash alike. Nothing here
    raises on a damaged record: that is the other checks' to report."""

    def __init__(self, report: IntegrityReport, seals: Sequence[Seal]) -> None:
        self.report = report
        self.hash = hashlib.sha256()
        self.position = 0
        self.pending = sorted(set(seals), key=lambda seal: seal.position)

    def add(self, row: Any) -> None:
        position = row["position"]
        self._compare_before(position)
        self.position = position
        for name in ("position", "originator_id", "originator_version", "topic", "state"):
            self.hash.update(_framed(row[name]))

    def finish(self) -> None:
        self._compare_before(None)
        self.report.seal = Seal(self.position, self._digest(self.position))

    def _digest(self, position: int) -> str:
        sealed = self.hash.copy()
        sealed.update(b"end" + _framed(position))
        return sealed.hexdigest()

    def _compare_before(self, position: int | None) -> None:
        """Every given seal of a position before this one: its records have all been read."""
        while self.pending and (position is None or self.pending[0].position < position):
            seal = self.pending.pop(0)
            if self._digest(seal.position) == seal.sha256:
                self.report.seals_held.append(seal)
                continue
            # A seal's position is that of the last event it sealed: nothing at it now says so.
            gone = f" (no event is stored at position {seal.position}, the last it sealed)"
            ends = gone if self.position < seal.position else ""
            self.report.seals_broken.append(
                f"seal {seal.position}: the stored events up to position {seal.position} are not"
                f" those it sealed{ends}: one was changed, removed or added, or the seal is not"
                " this store's"
            )


def _framed(value: Any) -> bytes:
    """A stored column's value as bytes no other value of any kind has: its kind, its length,
    its bytes."""
    if value is None:
        return b"n"
    if isinstance(value, bytes | bytearray | memoryview):
        kind, raw = b"b", bytes(value)
    elif isinstance(value, str):
        kind, raw = b"s", value.encode("utf-8", "surrogatepass")
    elif isinstance(value, int):
        kind, raw = b"i", str(value).encode()
    elif isinstance(value, UUID):  # PostgreSQL's uuid column
        kind, raw = b"u", value.bytes
    else:
        kind, raw = b"r", repr(value).encode("utf-8", "surrogatepass")
    return kind + str(len(raw)).encode() + b":" + raw


def _check_event(
    log: AuditLog, row: Any, report: IntegrityReport, halves: _Halves, signers: list[Webhook]
) -> None:
    position = row["position"]
    try:
        event = log.stored_event(row)
        if isinstance(event, DeliveryMarker.Created):
            report.markers += 1
            if UUID(str(event.originator_id)) != delivery_marker_id(event.svix_id):
                report.problem(
                    f"position {position}: the marker of {event.svix_id} is on another id"
                )
            halves.marker(
                (UUID(str(event.stream_id)), event.stream_version),
                _Digest(position, event.svix_id, event.sha256),
            )
        elif isinstance(event, RecordedDelivery):
            report.deliveries += 1
            # The recorded fields, not `event.delivery()`, which re-parses the body: a damaged
            # body is a digest that does not match, not an error that ends the walk.
            record = event.__dict__
            _check_delivery(report, position, record, signers)
            halves.delivery(
                (UUID(str(event.originator_id)), event.originator_version),
                _Digest(position, str(record.get("svix_id")), str(record.get("sha256"))),
            )
        else:
            report.problem(f"position {position}: an event of unexpected type {row['topic']}")
    except Exception as exc:  # whatever a damaged record raises, it is one problem
        report.problem(f"position {position}: cannot be read ({type(exc).__name__}: {exc})")


def _check_delivery(
    report: IntegrityReport, position: int, record: dict[str, Any], signers: list[Webhook]
) -> None:
    said = f"position {position}: delivery {record.get('svix_id')}:"
    body, digest = record.get("body"), record.get("sha256")
    if not isinstance(body, str) or hashlib.sha256(body.encode()).hexdigest() != digest:
        report.problem(f"{said} its body does not have the SHA-256 recorded with it")
        return  # nothing read from such a body says anything
    for name in _fields_not_from_body(record, body):
        report.problem(f"{said} its stored {name} is not what its body says")
    signature = record.get("signature")
    if signature is None:
        if report.first_signed is not None:
            report.problem(
                f"{said} it has no signature, though the delivery at position"
                f" {report.first_signed} has one (removed, or recorded by an older release"
                " beside a newer one)"
            )
        else:
            report.unsigned += 1
        return
    if report.first_signed is None:
        report.first_signed = position
    if signers and not _signed_by_one_of(signers, record, signature):
        report.problem(
            f"{said} no signing secret given makes its stored signature (its body or headers"
            " changed, or it was signed with a secret not given)"
        )
    elif signers:
        report.signed += 1


def _fields_not_from_body(record: dict[str, Any], body: str) -> list[str]:
    """The stored fields read from the body that it does not say. Read as every release has
    read them, not by today's acceptance rules: a body stored by a release that took it (a
    type over 256 characters, say) is as it was recorded."""
    try:
        envelope = read_envelope(body)
    except (ValueError, RecursionError):
        return []  # its digest matches: it is the body as received, unreadable as it was
    if not isinstance(envelope, dict):
        return []
    instance_id = envelope.get("instance_id")
    attributes = envelope.get("event_attributes")
    timestamp = envelope.get("timestamp")
    # Releases before 4fe3e4d (2026-11-28) kept any whole timestamp from 0 as it was.
    whole = isinstance(timestamp, int) and not isinstance(timestamp, bool) and timestamp >= 0
    readings = {
        "type": [envelope.get("type")],
        "occurred_at": [epoch_ms(timestamp), timestamp if whole else None],
        "instance_id": [instance_id if isinstance(instance_id, str) else None],
        "event_attributes": [attributes if isinstance(attributes, dict) else None],
    }
    return [name for name, read in readings.items() if record.get(name) not in read]


def _signed_by_one_of(signers: list[Webhook], record: dict[str, Any], signature: str) -> bool:
    sent = datetime.fromtimestamp(record["svix_timestamp"], tz=UTC)
    given = [entry.encode() for entry in signature.split(" ")]
    for signer in signers:
        expected = signer.sign(record["svix_id"], sent, record["body"]).encode()
        if any(hmac.compare_digest(expected, entry) for entry in given):
            return True
    return False


class _Halves:
    """Deliveries and markers read so far whose other half has not been. A marker is written
    right after its delivery, so each side holds a few at a time."""

    def __init__(self, report: IntegrityReport) -> None:
        self.report = report
        self.deliveries: dict[_Place, _Digest] = {}
        self.markers: dict[_Place, _Digest] = {}

    def delivery(self, place: _Place, delivery: _Digest) -> None:
        marker = self.markers.pop(place, None)
        if marker is None:
            self.deliveries[place] = delivery
        else:
            self._compare(delivery, marker)

    def marker(self, place: _Place, marker: _Digest) -> None:
        delivery = self.deliveries.pop(place, None)
        if delivery is None:
            self.markers[place] = marker
        else:
            self._compare(delivery, marker)

    def report_unpaired(self) -> None:
        for (stream, version), delivery in self.deliveries.items():
            self.report.problem(
                f"position {delivery.position}: delivery {delivery.svix_id} (stream {stream}"
                f" version {version}) has no marker"
            )
        for (stream, version), marker in self.markers.items():
            self.report.problem(
                f"position {marker.position}: the marker of {marker.svix_id} names stream"
                f" {stream} version {version}, which holds no delivery"
            )

    def _compare(self, delivery: _Digest, marker: _Digest) -> None:
        if marker.svix_id != delivery.svix_id:
            self.report.problem(
                f"position {marker.position}: the marker of {marker.svix_id} names the delivery"
                f" at position {delivery.position}, which is {delivery.svix_id}"
            )
        elif marker.sha256 != delivery.sha256:
            self.report.problem(
                f"position {delivery.position}: delivery {delivery.svix_id} has another SHA-256"
                " than its marker"
            )


def _check_streams(log: AuditLog, report: IntegrityReport) -> None:
    """Every stream's versions run 1..n: a version missing is an event deleted."""
    db = log.db
    table = db.table(db.events_table)
    found = db.fetchone(
        f"SELECT COUNT(DISTINCT originator_id) AS n FROM {table} WHERE topic <> %s",
        [DeliveryMarker.Created.TOPIC],
    )
    report.streams = found["n"]
    gapped = db.fetchall(
        "SELECT originator_id, COUNT(*) AS events, MAX(originator_version) AS last"
        f" FROM {table} GROUP BY originator_id"
        " HAVING MIN(originator_version) <> 1 OR MAX(originator_version) <> COUNT(*)"
    )
    for row in gapped:
        report.problem(
            f"stream {row['originator_id']}: {row['events']} events up to version"
            f" {row['last']}: {row['last'] - row['events']} missing"
        )
