"""Snapshots: a long stream is read from its latest snapshot, and gives what a full fold gives."""

from __future__ import annotations

import json

import pytest

import audit.application
from audit.aggregates import state
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


def test_a_snapshot_an_earlier_fold_took_is_not_read(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release whose fold kept something else (SNAPSHOT_VERSION): its snapshots must not
    be read. Here the last release's rule: every `session.*` type made a session."""
    monkeypatch.setattr(audit.application, "SNAPSHOT_EVERY", 10)
    with monkeypatch.context() as earlier:
        earlier.setattr(state, "SNAPSHOT_VERSION", 1)
        earlier.setattr(state, "FOLDED_TYPES", state.FOLDED_TYPES | {"session.tokenCreated"})
        token = payload("session.created")
        token.update(type="session.tokenCreated")
        token["data"].update(id="stkn_1", object="session_token")
        raw = json.dumps(token).encode()
        log.record([parse_delivery(raw, svix_id="msg_token", svix_timestamp=1, received_at=1)])
        log.record(session_events(25))
        assert "stkn_1" in {s["id"] for s in log.user_state(USER_ID).view()["sessions"]}
    stream = stream_id("user", USER_ID)

    def snapshot_versions() -> list[int]:
        assert log.snapshots is not None
        return [s.originator_version for s in log.snapshots.recorder.select_events(stream)]

    assert snapshot_versions() == [26]  # the earlier fold's
    full = fold_user((e.delivery(), e.originator_version) for e in log.stream_events(stream))
    assert log.user_state(USER_ID).view() == full.view()
    assert "stkn_1" not in {s["id"] for s in full.view()["sessions"]}
    log.record(session_events(10, start=25))
    assert (
        log.user_state(USER_ID).view()
        == fold_user((e.delivery(), e.originator_version) for e in log.stream_events(stream)).view()
    )
    assert snapshot_versions() == [26, 36]  # a new one
