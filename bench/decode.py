"""Decode benchmark: reading stored events back and writing them, by the store's transcoder
against eventsourcing's `JSONTranscoder` (the baseline), in one process, alternating.

    python bench/decode.py --events 20000 --rounds 5

Set-up generates N deliveries with `bench/store_fill.py`'s generator and encodes them as
`AuditLog.record` stores them (the delivery events only; markers are not read by projections).
Each round then times, with the baseline's transcoder and then the store's:
- `record`: `transcoder.decode(state)`, the stored record to Python values;
- `delivery`: what a projection pays per stored event, `mapper.to_domain_event` and `.delivery()`
  (`AuditLog.stored_delivery` without the database);
- `encode`: `transcoder.encode(record)`, a delivery event's record (a time among its values) to
  the bytes stored, as `record` writes it;
- `parse`: the webhook reading a body, `parse_delivery`; its baseline is the same function with
  `json.loads` for its reader, as before `4f1446e` (it still counts the brackets, which the
  code before did not).
It prints microseconds per event (the median of the rounds) and the ratio store/baseline, and
checks that both read every record to equal deliveries and write every record to equal bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.store_fill

from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent

from audit.aggregates import delivery as delivery_module
from audit.aggregates.delivery import parse_delivery
from audit.application import AuditLog
from audit.config import parse_database_url
from audit.projections.runner import MARKER_TOPIC
from bench.store_fill import World, stored_rows


def baseline_mapper(log: AuditLog) -> Mapper[Any]:
    """The application's mapper with eventsourcing's own transcoder, same transcodings."""
    transcoder = JSONTranscoder()
    log.register_transcodings(transcoder)
    return Mapper(transcoder=transcoder)


def timed(function: Callable[[Any], Any], items: list[Any]) -> float:
    """Microseconds per item of `function` over `items`."""
    started = time.perf_counter()
    for item in items:
        function(item)
    return (time.perf_counter() - started) / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        log = AuditLog(parse_database_url(f"sqlite:///{directory}/decode.db"))
        stored = [
            StoredEvent(
                originator_id=originator, originator_version=version, topic=topic, state=state
            )
            for originator, version, topic, state in stored_rows(
                log, World(events=args.events, seed=args.seed).deliveries(), {}
            )
            if topic != MARKER_TOPIC
        ]
        mappers = {"baseline": baseline_mapper(log), "store": log.mapper}
        log.close()

    for a, b in zip(
        (mappers["baseline"].to_domain_event(event).delivery() for event in stored),
        (mappers["store"].to_domain_event(event).delivery() for event in stored),
        strict=True,
    ):
        assert a == b, (a, b)
    records = [mappers["store"].transcoder.decode(event.state) for event in stored]
    for record in records:
        written = [mapper.transcoder.encode(record) for mapper in mappers.values()]
        assert written[0] == written[1], written
    bodies = [mappers["store"].to_domain_event(event).delivery().body.encode() for event in stored]
    store_reader = delivery_module.loads

    def parse(body: bytes) -> Any:
        return parse_delivery(body, svix_id="msg_1", svix_timestamp=1, received_at=1)

    figures: dict[tuple[str, str], list[float]] = {}
    states = [event.state for event in stored]
    for _ in range(args.rounds):
        for name, mapper in mappers.items():
            record = timed(mapper.transcoder.decode, states)
            to_delivery = mapper.to_domain_event
            delivery = timed(lambda event, read=to_delivery: read(event).delivery(), stored)
            encode = timed(mapper.transcoder.encode, records)
            delivery_module.loads = store_reader if name == "store" else json.loads
            parsed = timed(parse, bodies)
            delivery_module.loads = store_reader
            for what, figure in (
                ("record", record),
                ("delivery", delivery),
                ("encode", encode),
                ("parse", parsed),
            ):
                figures.setdefault((what, name), []).append(figure)

    mean_bytes = statistics.fmean(len(state) for state in states)
    print(
        f"# {len(stored)} delivery events, {mean_bytes:.0f} bytes each on average, "
        f"{args.rounds} rounds alternating, medians"
    )
    for what in ("record", "delivery", "encode", "parse"):
        base = statistics.median(figures[(what, "baseline")])
        ours = statistics.median(figures[(what, "store")])
        rounds = ",".join(f"{x:.1f}" for x in figures[(what, "store")])
        print(
            f"decode what={what} events={len(stored)} baseline={base:.1f}us store={ours:.1f}us"
            f" ratio={ours / base:.2f} store_rounds={rounds}"
        )


if __name__ == "__main__":
    main()
