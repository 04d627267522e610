"""`/openapi.json` and `/docs` describe exactly the routes the app serves; schemathesis fuzzes them.

Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from api.app import create_app
from api.read import ENDPOINTS
from audit.application import AuditLog
from audit.config import Settings
from audit.projections.runner import Projector
from tests.conftest import API_TOKEN
from tests.webhook_helpers import payload_files, post

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
KNOWN_IDS = {
    "user_id": "user_3XIOWrI57CYv83K9cu9aN3gSz5Q",
    "org_id": "org_3UByhZomz62ag88bTkeSUIU5gEC",
    "session_id": "sess_3nuW59H6KiTSqRrNmFSG0rZD6BO",
}
# The quick CI run; the long run sets AUDIT_FUZZ_EXAMPLES (tests/soak/README.md).
EXAMPLES_PER_OPERATION = int(os.environ.get("AUDIT_FUZZ_EXAMPLES", "25"))


def served_routes(app: Starlette) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of the app, through mounts; HEAD goes with GET."""
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                # OpenAPI's templates have no convertors: `{svix_id:path}` is `{svix_id}`.
                path = re.sub(r"{(\w+):\w+}", r"{\1}", prefix + route.path)
                for method in route.methods or ():
                    if method != "HEAD":
                        found.add((method, path))
            else:
                raise AssertionError(f"a route of an unexpected kind: {route!r}")

    walk(app.routes, "")
    return found


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


@pytest.fixture
def app(settings: Settings, log: AuditLog, secret: str) -> Iterator[Starlette]:
    projector = Projector(log)
    application = create_app(settings, log, projector=projector)
    with TestClient(application) as client:
        for path in payload_files():
            assert post(client, secret, path.read_bytes()).status_code == 200
    projector.run_once()
    yield application


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_every_route_is_documented_and_every_documented_route_exists(
    app: Starlette, client: TestClient
) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    served = served_routes(app)
    documented = documented_routes(document)
    assert served == documented
    assert ("POST", "/webhooks/clerk") in documented
    # Every status the webhook answers with (SPEC 2, and 408 for a body that never arrives).
    webhook = document["paths"]["/webhooks/clerk"]["post"]["responses"]
    assert set(webhook) == {"200", "400", "401", "408", "409", "413", "503"}
    assert {("GET", endpoint.full_path) for endpoint in ENDPOINTS} <= documented
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["description"], (method, path)
            assert operation["responses"], (method, path)
            in_path = set(re.findall(r"{(\w+)}", path))
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert in_path == declared, (method, path)
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearer": []}]
                assert "401" in operation["responses"]


def test_every_method_a_path_does_not_document_answers_405_naming_those_it_does(
    client: TestClient,
) -> None:
    """SPEC 4's 405, as the document's description states it for every path."""
    document = client.get("/openapi.json").json()
    assert "answers 405" in document["info"]["description"]
    for path, operations in document["paths"].items():
        url = path.format(**KNOWN_IDS, svix_id="msg_unknown")
        allowed = {method.upper() for method in operations}
        allowed |= {"HEAD"} if "GET" in allowed else set()
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - allowed:
            response = client.request(method, url, headers=AUTH)
            assert response.status_code == 405, (method, path, response.text)
            assert response.json()["error"]["code"] == "method_not_allowed", (method, path)
            assert set(response.headers["Allow"].split(", ")) == allowed, (method, path)


def test_documented_parameters_are_the_accepted_ones(client: TestClient) -> None:
    """Each documented query parameter is accepted; an undocumented one is refused."""
    document = client.get("/openapi.json").json()
    samples = {
        "limit": "2",
        "cursor": None,
        "since": "0",
        "until": "2030-01-01",
        "as_of": "0",
        "format": "json",
        "actor_ip": "203.0.113.7",
    }
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        url = path.format(**KNOWN_IDS, svix_id="msg_unknown")
        for parameter in operations["get"]["parameters"]:
            if parameter["in"] != "query" or parameter["name"] == "cursor":
                continue
            value = samples.get(parameter["name"], "x")
            response = client.get(url, params={parameter["name"]: value}, headers=AUTH)
            assert response.status_code in (200, 404), (path, parameter["name"], response.text)
        refused = client.get(url, params={"undocumented": "1"}, headers=AUTH)
        assert refused.status_code == 400, path
        assert refused.json()["error"]["code"] == "unknown_parameter"
        assert "400" in operations["get"]["responses"], path  # routes without parameters too


def test_every_list_is_documented_to_page(client: TestClient) -> None:
    """Every list takes `limit` and may answer a `next_cursor` (the projections' list said it
    was always null after it came to page; schemathesis found that only when it drew limit=1)."""
    document = client.get("/openapi.json").json()
    lists = 0
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        content = operations["get"]["responses"]["200"]["content"]["application/json"]
        properties = content["schema"].get("properties", {})
        if "next_cursor" not in properties:
            continue
        lists += 1
        assert properties["next_cursor"]["type"] == ["string", "null"], path
        names = {p["name"] for p in operations["get"]["parameters"] if p["in"] == "query"}
        assert {"limit", "cursor"} <= names, path
    assert lists >= 10  # the walk found them (events, changes, histories, sub-lists, ...)


def test_exports_are_described_column_by_column(client: TestClient) -> None:
    """The document names each column a CSV export sends, in order, on the page as well."""
    document = client.get("/openapi.json").json()
    page = client.get("/docs").text
    for path in ("/v1/events", "/v1/changes"):
        export = client.get(path, params={"format": "csv"}, headers=AUTH)
        assert export.status_code == 200
        header = export.text.split("\r\n", 1)[0].split(",")
        response = document["paths"][path]["get"]["responses"]["200"]
        described = response["content"]["text/csv"]["schema"]["description"]
        assert ", ".join(f"`{name}`" for name in header) in described, path
        assert "Content-Disposition" in response["headers"]
        assert "Columns: " + ", ".join(f"<code>{name}</code>" for name in header) in page


def test_every_503_says_when_to_retry_and_both_header_sets_are_documented(
    client: TestClient,
) -> None:
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            unavailable = operation["responses"].get("503")
            if unavailable and path != "/readyz":  # a probe's answer, not a request to retry
                assert "Retry-After" in unavailable["headers"], (method, path)
    webhook = document["paths"]["/webhooks/clerk"]["post"]
    names = ("id", "timestamp", "signature")
    assert {p["name"] for p in webhook["parameters"]} == {
        f"{prefix}-{name}" for prefix in ("svix", "webhook") for name in names
    }


def test_docs_page_renders_the_document(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        assert path in page
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                assert f"<code>{parameter['name']}</code>" in page
    assert "<script" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(app: Starlette) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the schema's own path
    assert {tuple(o.label.split(" ", 1)) for o in operations} == documented_routes(
        schema.raw_schema
    ) - {("GET", "/openapi.json")}
    try:
        for operation in operations:
            strategies = [operation.as_strategy()]
            known = {
                name: value for name, value in KNOWN_IDS.items() if f"{{{name}}}" in operation.path
            }
            if known:  # also against objects that exist, not only random ids
                strategies.append(operation.as_strategy(path_parameters=known))
            for strategy in strategies:

                @given(case=strategy)
                @settings(
                    max_examples=EXAMPLES_PER_OPERATION,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def run(case: Any) -> None:
                    case.call_and_validate(headers=AUTH, checks=checks)

                run()
    finally:
        shutdown_lifespans()
