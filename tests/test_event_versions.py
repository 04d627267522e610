"""Stored event classes carry a class version; an old-shape stored event still loads (upcasting)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from eventsourcing.persistence import StoredEvent

from audit.aggregates.routing import stream_id
from audit.aggregates.streams import RecordedDelivery, User
from audit.application import AuditLog
from tests.webhook_helpers import payload

USER_ID = payload("user.created")["data"]["id"]


def test_a_version_1_event_without_a_digest_still_loads(log: AuditLog) -> None:
    body = json.dumps(payload("user.created"))
    v1_state = {  # what version 1 stored: no sha256, no class_version key
        "timestamp": {
            "_type_": "datetime_iso",
            "_data_": datetime(2024, 5, 28, tzinfo=UTC).isoformat(),
        },
        "originator_topic": User.TOPIC,
        "svix_id": "msg_v1",
        "svix_timestamp": 1716883200,
        "type": "user.created",
        "occurred_at": 1716883200018,
        "instance_id": "ins_1",
        "event_attributes": None,
        "received_at": 1716883200100,
        "body": body,
    }
    stream = stream_id("user", USER_ID)
    log.recorder.insert_events(
        [
            StoredEvent(
                originator_id=stream,
                originator_version=1,
                topic=User.Created.TOPIC,
                state=json.dumps(v1_state).encode(),
            )
        ]
    )
    (event,) = log.stream_events(stream)
    assert isinstance(event, RecordedDelivery)
    assert RecordedDelivery.class_version == 3
    import hashlib

    assert event.sha256 == hashlib.sha256(body.encode()).hexdigest()
    assert event.signature is None  # version 3 keeps the signature header; older ones had none
    state = log.user_state(USER_ID)
    assert state.view()["data"]["first_name"] == payload("user.created")["data"]["first_name"]
