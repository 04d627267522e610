"""Snapshots: a long stream is read from its latest snapshot, and gives what a full fold gives."""

from __future__ import annotations

import json

import pytest

import audit.application
from audit.aggregates.delivery import Delivery, parse_delivery
from audit.aggregates.routing import stream_id
from audit.aggregates.state import fold_user
from audit.application import AuditLog
from tests.webhook_helpers import payload

USER_ID = payload("user.created")["data"]["id"]


def session_events(count: int, start: int = 0) -> list[Delivery]:
    deliveries = []
    for index in range(start, start + count):
        envelope = payload("session.created")
        envelope["data"]["id"] = f"sess_{index}"
        envelope["data"]["updated_at"] = 1_716_883_200_000 + index
        envelope["timestamp"] = 1_716_883_200_000 + index
        raw = json.dumps(envelope).encode()
        deliveries.append(
            parse_delivery(raw, svix_id=f"msg_{index}", svix_timestamp=1, received_at=index)
        )
    return deliveries


def test_a_long_stream_reads_from_its_snapshot(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit.application, "SNAPSHOT_EVERY", 10)
    stream = stream_id("user", USER_ID)
    assert log.snapshots is not None
    log.record(session_events(25))
    first = log.user_state(USER_ID).view()
    (snapshot,) = log.snapshots.get(stream)
    assert snapshot.originator_version == 25

    log.record(session_events(5, start=25))
    from_snapshot = log.user_state(USER_ID)
    assert list(log.snapshots.get(stream))[-1].originator_version == 25  # only 5 folded since
    full = fold_user((e.delivery(), e.originator_version) for e in log.stream_events(stream))
    assert from_snapshot.view() == full.view()
    assert len(from_snapshot.view()["sessions"]) == 30 != len(first["sessions"])
    assert [e.to_dict() for e in from_snapshot.history_entries()] == [
        e.to_dict() for e in full.history_entries()
    ]
