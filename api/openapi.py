"""`GET /openapi.json` (OpenAPI 3.1) and `GET /docs` (the same, as a page a person can read).

The `/v1` paths are generated from `api.read.ENDPOINTS`, the table that also builds the routes and
validates their parameters, so they cannot drift. The few routes outside `/v1` are described in
`OTHER_OPERATIONS`; `tests/test_openapi.py` checks both against the application's route table.
"""

from __future__ import annotations

import copy
import functools
import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from api.read import ENDPOINTS, EXPORT_TYPES, READ_SECONDS, Endpoint, Param

NULLABLE_STRING = {"type": ["string", "null"]}
TIME = {"type": ["string", "null"], "format": "date-time", "examples": ["2024-05-28T08:06:40.018Z"]}
ANY_OBJECT = {"type": ["object", "null"]}


def _object(properties: dict[str, Any], *, extra: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
    }
    if not extra:
        schema["additionalProperties"] = False
    return schema


ACTOR = _object(
    {
        "ip": NULLABLE_STRING,
        "user_agent": NULLABLE_STRING,
        "user_id": NULLABLE_STRING,
        "impersonator": NULLABLE_STRING,
    }
)
ACTOR["description"] = (
    "Who caused the event, as far as it tells: the client IP and user agent of the request, the "
    "Clerk user named as acting, and the impersonator of an impersonation session."
)
TIMELINE_ACTOR = _object(
    {
        **ACTOR["properties"],
        "session_actor": {
            "type": ["object", "null"],
            "description": "The session's own `actor` (an impersonation), or null.",
        },
    }
)
TIMELINE_ACTOR["description"] = ACTOR["description"]
FIELD_CHANGE = _object({"field": {"type": "string"}, "from": {}, "to": {}})

SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {"error": _object({"code": {"type": "string"}, "message": {"type": "string"}})}
    ),
    "Actor": ACTOR,
    "Event": _object(
        {
            "id": {"type": "string", "description": "The svix-id."},
            "position": {"type": "integer", "description": "Position in the event store."},
            "type": {"type": "string"},
            "subject": _object({"id": NULLABLE_STRING, "object": NULLABLE_STRING}),
            "occurred_at": TIME,
            "received_at": TIME,
            "instance_id": NULLABLE_STRING,
            "actor": {"$ref": "#/components/schemas/Actor"},
            "data": {**ANY_OBJECT, "description": "The event's data, secrets redacted."},
        }
    ),
    "ObjectState": _object(
        {
            "id": {"type": "string"},
            "deleted": {"type": "boolean"},
            "data": {**ANY_OBJECT, "description": "The object as Clerk last sent it."},
            "updated_at": TIME,
            "as_of": {**TIME, "description": "The `as_of` asked for, or null for current state."},
        }
    ),
    "HistoryEntry": _object(
        {
            "position": {"type": "integer"},
            "event_id": {"type": "string"},
            "type": {"type": "string"},
            "occurred_at": TIME,
            "actor": {"$ref": "#/components/schemas/Actor"},
            "stale": {
                "type": "boolean",
                "description": "Arrived after a version that sorts after it (by the object's "
                "`updated_at`, then time): recorded where it belongs, its changes taken against "
                "the version before it. It does not become the current version, but one just "
                "before a deletion becomes the deleted object's last known data.",
            },
            "changes": {"type": "array", "items": FIELD_CHANGE},
            "object": _object({"id": {"type": "string"}, "type": {"type": "string"}}),
        }
    ),
    "Change": _object(
        {
            "position": {"type": "integer"},
            "event_id": {"type": "string"},
            "type": {"type": "string"},
            "occurred_at": TIME,
            "subject": _object({"id": {"type": "string"}, "object": {"type": "string"}}),
            "owner_id": {"type": "string"},
            "field": {"type": "string"},
            "from": {},
            "to": {},
            "actor": {"$ref": "#/components/schemas/Actor"},
            "stale": {"type": "boolean"},
        }
    ),
    "Session": _object(
        {
            "id": {"type": "string"},
            "user_id": NULLABLE_STRING,
            "status": NULLABLE_STRING,
            "created_at": TIME,
            "ended_at": TIME,
            "last_active_at": TIME,
            "latest_activity": ANY_OBJECT,
            "actor": ANY_OBJECT,
            "client_id": NULLABLE_STRING,
        }
    ),
    "Membership": _object(
        {
            "id": {"type": "string"},
            "organization_id": NULLABLE_STRING,
            "user_id": NULLABLE_STRING,
            "role": NULLABLE_STRING,
            "role_name": NULLABLE_STRING,
            "permissions": {"type": ["array", "null"]},
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "Invitation": _object(
        {
            "id": {"type": "string"},
            "organization_id": NULLABLE_STRING,
            "email_address": NULLABLE_STRING,
            "role": NULLABLE_STRING,
            "status": NULLABLE_STRING,
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "Domain": _object(
        {
            "id": {"type": "string"},
            "organization_id": NULLABLE_STRING,
            "name": NULLABLE_STRING,
            "enrollment_mode": NULLABLE_STRING,
            "verification": ANY_OBJECT,
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "TimelineEntry": _object(
        {
            "position": {"type": "integer"},
            "event_id": {"type": "string"},
            "type": {"type": "string"},
            "status": NULLABLE_STRING,
            "occurred_at": TIME,
            "actor": TIMELINE_ACTOR,
            "activity": ANY_OBJECT,
        }
    ),
    "Projection": _object(
        {
            "name": {"type": "string"},
            "version": {"type": "integer"},
            "position": {"type": "integer"},
            "lag": {"type": "integer", "description": "Events in the store not yet applied."},
            "state": {"type": "string", "enum": ["live", "rebuilding"]},
            "errors": {"type": "integer", "description": "Events this projection failed on."},
            "serving_version": {"type": "integer"},
            "serving_position": {"type": "integer"},
            "serving_lag": {
                "type": "integer",
                "description": "The lag of the generation reads use: while `rebuilding`,"
                " `version`, `position` and `lag` are the build's.",
            },
        }
    ),
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _retry_later(description: str) -> dict[str, Any]:
    """A 503: every one says when to try again."""
    return {
        **_error(description),
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        },
    }


def _export_description(fmt: str, endpoint: Endpoint) -> str:
    if fmt != "csv":
        return "The ndjson export: one JSON item a line, as in `data`."
    names = ", ".join(f"`{name}`" for name, _ in endpoint.export_columns or ())
    return (
        f"The csv export: a header row, then a row an item. Columns: {names}. A `data`, `from`"
        " or `to` cell holds the item's value as JSON text (`null` for null); other missing"
        " values are empty cells. A text cell starting with `=`, `+`, `-`, `@`, tab or carriage"
        " return is prefixed with `'`, so that a spreadsheet does not run it."
    )


def _parameter(param: Param) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "description": param.description,
        "required": param.location == "path",
        "schema": copy.deepcopy(param.schema),
    }
    if param.repeatable:
        spec["style"] = "form"
        spec["explode"] = True
    if param.example is not None:
        spec["example"] = param.example
    return spec


def _read_operation(endpoint: Endpoint) -> dict[str, Any]:
    item = {"$ref": f"#/components/schemas/{endpoint.schema}"}
    body: dict[str, Any]
    if endpoint.is_list:
        body = _object(
            {
                "data": {"type": "array", "items": item},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null on the last page.",
                },
            }
        )
    else:
        body = item
    content: dict[str, Any] = {"application/json": {"schema": body}}
    if endpoint.exportable:
        for fmt, media_type in EXPORT_TYPES.items():
            content[media_type.split(";")[0]] = {
                "schema": {"type": "string", "description": _export_description(fmt, endpoint)}
            }
    responses: dict[str, Any] = {"200": {"description": endpoint.summary, "content": content}}
    if endpoint.exportable:
        responses["200"]["headers"] = {
            "Content-Disposition": {
                "description": "On an export: `attachment` with a file name.",
                "schema": {"type": "string"},
            }
        }
    if any(p.location == "query" for p in endpoint.params):
        responses["400"] = _error("A parameter is malformed (limit, cursor, time, unknown name).")
    else:
        responses["400"] = _error("A query parameter was given: this route takes none.")
    responses["401"] = {
        **_error("No valid bearer token."),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    }
    if endpoint.not_found:
        responses["404"] = _error("No such id.")
    responses["503"] = _retry_later(
        f"The store is unavailable, or the read did not finish within {READ_SECONDS:g} s (an"
        " export is then cut instead), or the read model is not built yet."
    )
    return {
        "operationId": endpoint.handler.__name__,
        "summary": endpoint.summary,
        "description": endpoint.description,
        "tags": ["read"],
        "parameters": [_parameter(p) for p in endpoint.params],
        "responses": responses,
        "security": [{"bearer": []}],
    }


STATUS_BODY = _object({"status": {"type": "string"}})

# Routes outside /v1: method -> path -> operation.
OTHER_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/webhooks/clerk"): {
        "operationId": "receive_webhook",
        "summary": "Receive a Clerk webhook",
        "description": "Svix-signed delivery from Clerk (`svix-*` or `webhook-*` headers). "
        "Verified, then appended to the event store verbatim. A redelivery of a recorded svix-id "
        "answers `duplicate`.",
        "tags": ["intake"],
        "parameters": [
            {
                "name": f"{prefix}-{name}",
                "in": "header",
                "description": "Each of id, timestamp and signature is read from `svix-*`, else"
                " from `webhook-*`: one of the two is required.",
                "required": False,
                "schema": {"type": "string"},
            }
            for prefix in ("svix", "webhook")
            for name in ("id", "timestamp", "signature")
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _object({"type": {"type": "string"}, "data": {"type": "object"}})
                }
            },
        },
        "responses": {
            "200": {
                "description": "Recorded, or a duplicate of a recorded delivery.",
                "content": {
                    "application/json": {
                        "schema": _object(
                            {
                                "status": {"type": "string", "enum": ["recorded", "duplicate"]},
                                "event_id": {"type": "string"},
                                "position": {"type": "integer"},
                            }
                        )
                    }
                },
            },
            "400": _error("Headers missing or malformed, or the body is not an event."),
            "401": _error("No signature matches, or the timestamp is outside tolerance."),
            "408": _error("The body did not arrive in time (a stalled sender); nothing is kept."),
            "409": _error("This svix-id is recorded with a different body."),
            "413": _error("The body is too large."),
            "503": _retry_later("The event store is unavailable; retry later."),
        },
    },
    ("get", "/healthz"): {
        "operationId": "healthz",
        "summary": "Liveness",
        "description": "The process is alive.",
        "tags": ["health"],
        "responses": {
            "200": {
                "description": "Alive.",
                "content": {"application/json": {"schema": STATUS_BODY}},
            }
        },
    },
    ("get", "/readyz"): {
        "operationId": "readyz",
        "summary": "Readiness",
        "description": "The event store is reachable.",
        "tags": ["health"],
        "responses": {
            "200": {
                "description": "Ready.",
                "content": {"application/json": {"schema": STATUS_BODY}},
            },
            "503": _error("The event store is unreachable."),
        },
    },
    ("get", "/openapi.json"): {
        "operationId": "openapi",
        "summary": "This document",
        "description": "The OpenAPI 3.1 description of every route.",
        "tags": ["docs"],
        "responses": {
            "200": {
                "description": "OpenAPI 3.1.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    },
    ("get", "/docs"): {
        "operationId": "docs",
        "summary": "Documentation",
        "description": "This document as a page to read.",
        "tags": ["docs"],
        "responses": {
            "200": {
                "description": "HTML.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    },
}


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.full_path, {})["get"] = _read_operation(endpoint)
    for (method, path), operation in OTHER_OPERATIONS.items():
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clerk-audit",
            "version": "1",
            "description": "An event-sourced audit log for Clerk webhooks. The read API under "
            "`/v1` is GET-only and needs `Authorization: Bearer <token>` (AUDIT_API_TOKENS). "
            "Times are ISO 8601 UTC with milliseconds; `since`/`until` accept ISO 8601 or epoch "
            "milliseconds and select [since, until) on occurred_at. Lists answer "
            "`{data, next_cursor}`. OTP codes, e-mail bodies, SMS messages and invitation URLs "
            "are always redacted. Any method a path does not list here answers 405 "
            "(`method_not_allowed`, with an `Allow` header naming the ones it does; HEAD goes "
            "with GET).",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy)."""
    return copy.deepcopy(_document())


async def openapi_json(request: Request) -> Response:
    return JSONResponse(_document())


# -- /docs --------------------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{margin-bottom:0}code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
section{border-top:1px solid #ddd;padding:.5rem 0}
.method{font:bold 13px monospace;text-transform:uppercase;padding:.1em .4em;border-radius:3px;
background:#e7f0ff}.method.post{background:#eaf7e7}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#fafafa}.muted{color:#666}
"""


def _inline_code(text: str) -> str:
    """Escape, then show `backticked` spans as code."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def _schema_label(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " | ".join(kind)
    if kind == "array":
        kind = f"{_schema_label(schema.get('items', {}))}, repeatable"
    if "enum" in schema:
        kind += ": " + ", ".join(str(value) for value in schema["enum"])
    if "minimum" in schema or "maximum" in schema:
        kind += f" ({schema.get('minimum', '')}..{schema.get('maximum', '')})"
    return kind


def _answer_html(document: dict[str, Any], success: dict[str, Any]) -> list[str]:
    """The fields of a 200's JSON answer (of each item, for a list), and its exports."""
    out = []
    content = success.get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    listed = schema.get("properties", {}).get("data", {}).get("items")
    reference = (listed or schema).get("$ref", "")
    if reference.startswith("#/components/schemas/"):
        component = document["components"]["schemas"][reference.rsplit("/", 1)[1]]
        fields = ", ".join(f"<code>{html.escape(name)}</code>" for name in component["properties"])
        out.append(f"<p>{'Each item' if listed else 'Answer'}: {fields}.</p>")
    for media_type, export in content.items():
        if media_type != "application/json":
            description = _inline_code(export["schema"].get("description", ""))
            out.append(f"<p><code>{html.escape(media_type)}</code>: {description}</p>")
    return out


def docs_html(document: dict[str, Any]) -> str:
    info = document["info"]
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(info['title'])} API</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(info['title'])} API</h1>",
        f"<p class=muted>OpenAPI {html.escape(document['openapi'])} &middot; "
        "machine-readable at <a href='/openapi.json'><code>/openapi.json</code></a></p>",
        f"<p>{_inline_code(info['description'])}</p>",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            out.append(f"<section id='{html.escape(operation['operationId'])}'>")
            out.append(
                f"<h2><span class='method {method}'>{method}</span> "
                f"<code>{html.escape(path)}</code> &mdash; {html.escape(operation['summary'])}</h2>"
            )
            out.append(f"<p>{_inline_code(operation['description'])}</p>")
            if operation.get("security"):
                out.append(
                    "<p class=muted>Needs <code>Authorization: Bearer &lt;token&gt;</code>.</p>"
                )
            parameters = operation.get("parameters", [])
            if parameters:
                out.append(
                    "<table><tr><th>parameter</th><th>in</th><th>type</th><th>meaning</th></tr>"
                )
                for parameter in parameters:
                    out.append(
                        f"<tr><td><code>{html.escape(parameter['name'])}</code></td>"
                        f"<td>{html.escape(parameter['in'])}</td>"
                        f"<td>{html.escape(_schema_label(parameter['schema']))}</td>"
                        f"<td>{_inline_code(parameter.get('description', ''))}</td></tr>"
                    )
                out.append("</table>")
            out += _answer_html(document, operation["responses"].get("200", {}))
            statuses = ", ".join(
                f"<code>{html.escape(status)}</code> {html.escape(response['description'])}"
                for status, response in operation["responses"].items()
            )
            out.append(f"<p class=muted>Responses: {statuses}</p></section>")
    out.append("</body></html>")
    return "\n".join(out)


@functools.cache
def _docs_page() -> str:
    return docs_html(_document())


async def docs(request: Request) -> Response:
    return HTMLResponse(_docs_page())


def openapi_routes() -> list[BaseRoute]:
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
