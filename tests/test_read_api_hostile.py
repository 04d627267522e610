"""Read API under hostile input: NUL bytes, injection attempts, traversal; never a 5xx."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from api.access_log import loggable_path
from api.app import create_app
from audit.application import AuditLog
from audit.config import Settings
from audit.projections.runner import Projector
from tests.conftest import API_TOKEN
from tests.webhook_helpers import payload, post

NASTY = [
    "\x00",
    "a\x00b",
    "' OR '1'='1",
    "1; DROP TABLE audit_events; --",
    "../../etc/passwd",
    "%2e%2e%2f",
    "\ud7ff" * 50,
    "x" * 5000,
]


@pytest.fixture
def reader(settings: Settings, log: AuditLog, secret: str):
    projector = Projector(log)
    with TestClient(
        create_app(settings, log, projector=projector), raise_server_exceptions=False
    ) as client:
        post(client, secret, payload("user.created"))
        projector.run_once()
        client.headers["Authorization"] = f"Bearer {API_TOKEN}"
        yield client


@pytest.mark.parametrize("value", NASTY)
def test_nasty_filters_and_ids_never_5xx(reader: TestClient, log: AuditLog, value: str) -> None:
    segment = quote(value, safe="")
    requests = [
        ("/v1/events", {"subject": value}),
        ("/v1/events", {"type": value}),
        ("/v1/changes", {"field": value}),
        ("/v1/changes", {"actor_ip": value}),
        ("/v1/changes", {"subject": value}),
        ("/v1/events", {"since": value}),
        ("/v1/events", {"cursor": value}),
        (f"/v1/users/{segment}", {}),
        (f"/v1/users/{segment}/history", {}),
        (f"/v1/organizations/{segment}/members", {}),
        (f"/v1/sessions/{segment}/timeline", {}),
        (f"/v1/events/{segment}", {}),
    ]
    for path, params in requests:
        response = reader.get(path, params=params)
        assert response.status_code < 500, (path, params, response.status_code, response.text)
    assert log.recorder.max_notification_id() == 2  # nothing was dropped or added


def test_tokens_never_reach_the_logs(reader: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    wrong = "wrong-token-" + "9" * 20
    reader.get("/v1/events", params={"access_token": API_TOKEN, "token": wrong})
    reader.get("/v1/events", headers={"Authorization": f"Bearer {wrong}"})
    reader.get("/v1/events")
    # Everything the service logged (the test's own HTTP client logs its URLs: not ours).
    logged = "\n".join(
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    )
    assert "GET /v1/events 200" in logged  # the access log is there, and says what it should
    assert API_TOKEN not in logged and wrong not in logged


def test_a_path_cannot_write_lines_into_the_access_log(
    reader: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The path was logged decoded: `%0A` wrote a line of the client's choosing (a forged
    entry, no token needed) and `%00` made the log a binary file (review E). It is logged as
    sent, still percent-encoded; a path with no raw form has its control characters escaped."""
    caplog.set_level("INFO")
    forged = "2026-12-05 21:00:00,000 INFO audit.access GET /v1/FORGED 200 0.1ms"
    reader.get("/nope%0A" + forged.replace(" ", "%20"))
    reader.get("/v1/events/%00")
    accesses = [r.getMessage() for r in caplog.records if r.name == "audit.access"]
    assert accesses[0].startswith("GET /nope%0A2026-12-05%2021:00:00,000%20INFO"), accesses
    assert accesses[1].startswith("GET /v1/events/%00 "), accesses
    assert all(a.isprintable() for a in accesses), accesses
    assert loggable_path({"path": "/a\nb\x00c"}) == "/a\\nb\\x00c"
    assert loggable_path({"path": "/caf\u00e9", "raw_path": b"/caf%C3%A9"}) == "/caf%C3%A9"


def test_a_malformed_id_in_a_path_is_a_404_naming_what_it_identifies(reader: TestClient) -> None:
    """`/v1/events/%00` said "No svix '\\x00'." (the parameter's name cut at `_id`; review E)."""
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for path, label in (
        ("/v1/events/%00", "event"),
        ("/v1/organizations/%00", "organization"),
        ("/v1/users/%00/history", "user"),
        ("/v1/sessions/%00/timeline", "session"),
    ):
        response = reader.get(path, headers=auth)
        assert response.status_code == 404, path
        assert response.json()["error"]["message"] == f"No {label} '\\x00'.", path


def test_an_id_of_another_kind_under_a_route_is_a_404(reader: TestClient) -> None:
    """`/v1/users/org_.../history` answered the organization's history, and
    `/v1/organizations/user_.../history` the user's with their sessions; other such routes an
    empty list (review E). SPEC 4: an unknown id is a 404."""
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    user, org, session = (
        "user_3XIOWrI57CYv83K9cu9aN3gSz5Q",
        "org_3UByhZomz62ag88bTkeSUIU5gEC",
        "sess_x",
    )
    for path, said in (
        (f"/v1/users/{org}/history", f"No user '{org}': that is the id of an organization."),
        (f"/v1/users/{org}", f"No user '{org}': that is the id of an organization."),
        (
            f"/v1/organizations/{user}/history",
            f"No organization '{user}': that is the id of a user.",
        ),
        (
            f"/v1/organizations/{user}/members",
            f"No organization '{user}': that is the id of a user.",
        ),
        (f"/v1/sessions/{user}/timeline", f"No session '{user}': that is the id of a user."),
        (f"/v1/users/{session}/sessions", f"No user '{session}': that is the id of a session."),
    ):
        response = reader.get(path, headers=auth)
        assert (response.status_code, response.json()["error"]["message"]) == (404, said), path
    assert reader.get(f"/v1/users/{user}/history", headers=auth).status_code == 200
