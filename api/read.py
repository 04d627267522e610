"""The read API (SPEC 4): GET-only routes under `/v1`, behind a bearer token.

`ENDPOINTS` is the one route table: it builds the Starlette routes, decides which query parameters
each route accepts (anything else is a 400, so a misspelt filter never silently returns everything),
and is what `api.openapi` documents. Handlers are plain functions, run in a read thread
(`api.app.READ_THREADS` at once) with a deadline (`api.deadline`); SQL lives in `audit.queries`;
everything that leaves is rendered here, with ISO times and through `audit.redaction.redact`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, Router

from api.auth import BearerAuth
from api.deadline import ReadThreads
from api.errors import RETRY_AFTER_SECONDS, ApiError
from api.responses import ExportResponse, JSONResponse
from audit import queries
from audit.addresses import AddressFilter
from audit.aggregates.state import created_sort_key, has_versions
from audit.aggregates.versions import OrderKey
from audit.application import AuditLog
from audit.cursors import MAX_CURSOR_LENGTH, CursorError, decode_cursor, encode_cursor
from audit.jsontext import dumps
from audit.projections.runner import Behind, reads_behind
from audit.queries import ChangeFilters, EventFilters, Page, ProjectionNotReady, TypeFilter
from audit.redaction import redact, redact_change
from audit.storage import Db
from audit.timeparse import TimeParseError, format_time, parse_time

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
EXPORT_PAGE_ROWS = 1000
MAX_VALUE_LENGTH = 512
MAX_REPEATS = 100  # values of one repeatable parameter (field=, type=)
EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
# How long a request, or one chunk of an export, may wait on the store before it answers 503 (or
# the export ends in an error). The routes answer in milliseconds; a fold of a long stream for
# `as_of` in seconds: this is far past both, and ends a stall (api.deadline).
READ_SECONDS = 30.0


# -- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    schema: dict[str, Any]
    location: str = "query"
    repeatable: bool = False
    example: Any = None


TIME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "description": "ISO 8601 (`2024-05-28T08:06:40.018Z`; UTC when no offset) or epoch "
    "milliseconds.",
}

# How a 404 names what a path parameter identifies (`svix_id`: "No svix" read as nonsense).
PATH_LABELS = {
    "user_id": "user",
    "org_id": "organization",
    "session_id": "session",
    "svix_id": "event",
}
# Clerk's id prefixes. An id of another kind under a route (`/v1/users/org_.../history`, or a
# role's, a membership's) was answered with that object's history, or an empty list, instead of
# a 404: every Clerk id of a kind starts with its prefix.
ID_PREFIXES = {"user_id": "user_", "org_id": "org_", "session_id": "sess_"}
ID_KINDS = {
    "user_": "a user",
    "org_": "an organization",
    "sess_": "a session",
    "orgmem_": "an organization membership",
    "orginv_": "an organization invitation",
    "orgdmn_": "an organization domain",
    "role_": "a role",
    "perm_": "a permission",
    "idn_": "an e-mail address, phone number or other identification",
    "ema_": "an e-mail",
    "sms_": "an SMS message",
    "inv_": "an invitation",
    "client_": "a client",
}


def _wrong_kind_of_id(name: str, value: str) -> str | None:
    """Why `value` cannot be the id of what `name` takes (None: it may be): what its prefix
    says it is the id of. (An id with no Clerk prefix is left to the read: a store may hold a
    hand-made delivery's `abc123` as a user.)"""
    expected = ID_PREFIXES.get(name)
    if expected is None or value.startswith(expected):
        return None
    other = next((kind for prefix, kind in ID_KINDS.items() if value.startswith(prefix)), None)
    return None if other is None else f"that is the id of {other}"


LIMIT = Param(
    "limit",
    f"Items per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}).",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
)
CURSOR = Param(
    "cursor",
    "Opaque `next_cursor` of the previous page, with the same filters (`limit` may change; other"
    " filters are a 400). Walking cursors visits every item exactly once, even while new events"
    " arrive.",
    {"type": "string"},
)
SINCE = Param("since", "Only items that occurred at or after this time (inclusive).", TIME_SCHEMA)
UNTIL = Param("until", "Only items that occurred before this time (exclusive).", TIME_SCHEMA)
TYPE = Param(
    "type",
    "Event type; repeat for several (any of them). `user.*` matches every type starting `user.`.",
    {"type": "array", "items": {"type": "string"}, "maxItems": MAX_REPEATS},
    repeatable=True,
    example=["user.updated"],
)
EVENT_SUBJECT = Param(
    "subject",
    "A Clerk id: only events that concern it (their subject, or a related user, organization, "
    "session, inviter...).",
    {"type": "string"},
    example="user_3XIOWrI57CYv83K9cu9aN3gSz5Q",
)
CHANGE_SUBJECT = Param(
    "subject",
    "A Clerk id: changes to that object, or to any object it owns (a user's sessions, an "
    "organization's memberships, invitations and domains), and a user's memberships.",
    {"type": "string"},
)
FIELD = Param(
    "field",
    "Dotted field path (`first_name`, `email_addresses.idn_x.email_address`); a key's own `.`"
    " and `\\` are escaped with `\\` (`unsafe_metadata.a\\.b`), a NUL is `\\0`; repeatable."
    " A change listed at an enclosing path (`email_addresses.idn_x`: the element added or"
    " removed whole) is one of the field's too, and so is one at any path under it"
    " (`public_metadata` finds the changes of each of its keys, `email_addresses` those of"
    " every address).",
    {"type": "array", "items": {"type": "string"}, "maxItems": MAX_REPEATS},
    repeatable=True,
    example=["first_name"],
)
ACTOR_IP = Param(
    "actor_ip",
    "Only changes made from this client IP, as `actor.ip` shows it; an address is also"
    " found in its other usual notations (upper or lower case, compressed or expanded, IPv4"
    " mapped into IPv6). A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`) finds"
    " the changes made from any of its addresses; an IPv4 network also finds them written"
    " mapped into IPv6.",
    {"type": "string"},
)
FORMAT = Param(
    "format",
    "`csv` or `ndjson` streams the whole filtered result as an export (from `cursor` when given; "
    "up to the last item that existed when the export began; `limit`, if given, is still checked). "
    "`Accept: text/csv` does the same. Default `json`: one page.",
    {"type": "string", "enum": ["json", "csv", "ndjson"]},
)
AS_OF = Param(
    "as_of",
    "Rebuild the state from the event stream as of this occurred_at (inclusive).",
    TIME_SCHEMA,
)
AS_OF_LIST = Param(
    "as_of",
    "The list as of this occurred_at (inclusive), rebuilt from the event stream as the state's"
    " `as_of` is, in creation order.",
    TIME_SCHEMA,
)


def path_param(name: str, description: str) -> Param:
    return Param(name, description, {"type": "string"}, location="path")


USER_ID = path_param("user_id", "A Clerk user id (`user_...`).")
ORG_ID = path_param("org_id", "A Clerk organization id (`org_...`).")
SESSION_ID = path_param("session_id", "A Clerk session id (`sess_...`).")
SVIX_ID = path_param("svix_id", "The event's `svix-id` (`msg_...`).")


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


class Args:
    """The validated parameters of one request."""

    def __init__(self, request: Request, endpoint: Endpoint) -> None:
        self.request = request
        self.query = request.query_params
        accepted = {p.name: p for p in endpoint.params if p.location == "query"}
        for name in self.query:
            param = accepted.get(name)
            if param is None:
                known = ", ".join(sorted(accepted)) or "none"
                raise bad_request(
                    "unknown_parameter",
                    f"Unknown query parameter {name[:40]!r} (accepted: {known}).",
                )
            values = self.query.getlist(name)
            if not param.repeatable and len(values) > 1:
                raise bad_request("invalid_parameter", f"{name!r} may be given only once.")
            if len(values) > MAX_REPEATS:  # SQLite refuses an expression of a thousand ORs
                raise bad_request(
                    "invalid_parameter", f"{name!r} may be given at most {MAX_REPEATS} times."
                )
            for value in values:
                limit = MAX_CURSOR_LENGTH if name == "cursor" else MAX_VALUE_LENGTH
                if "\x00" in value or len(value) > limit:
                    raise bad_request("invalid_parameter", f"{name!r} is malformed or too long.")
        for param in endpoint.params:
            if param.location == "path":
                value = request.path_params[param.name]
                if "\x00" in value or len(value) > MAX_VALUE_LENGTH:
                    raise not_found(f"No {PATH_LABELS[param.name]} {value[:40]!r}.")
                wrong = _wrong_kind_of_id(param.name, value)
                if wrong is not None:
                    raise not_found(f"No {PATH_LABELS[param.name]} {value[:80]!r}: {wrong}.")

    def path(self, name: str) -> str:
        return self.request.path_params[name]

    def one(self, name: str) -> str | None:
        return self.filter_values(name)[0] if name in self.query else None

    def many(self, name: str) -> list[str]:
        return self.filter_values(name)

    def filter_values(self, name: str) -> list[str]:
        """A filter's values. An empty one is a 400: `type=` was ignored (everything) while
        `subject=` matched nothing, and a filter left blank by a script is better refused."""
        values = self.query.getlist(name)
        if "" in values:
            raise bad_request("invalid_parameter", f"{name!r} is empty.")
        return values

    def limit(self) -> int:
        raw = self.query.get("limit")
        if raw is None:
            return DEFAULT_LIMIT
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise bad_request(
                "invalid_limit", f"'limit' must be a whole number from 1 to {MAX_LIMIT}."
            )
        return int(raw)

    def time(self, name: str) -> int | None:
        """`since` and `until` bound the times before them out (`occurred_at >= since`,
        `< until`): a time between two milliseconds counts as the later one. `as_of` takes in
        what happened by then: the earlier."""
        raw = self.query.get(name)
        if raw is None:
            return None
        try:
            return parse_time(raw, round_up=name in ("since", "until"))
        except TimeParseError as exc:
            raise bad_request(
                "invalid_time", f"{name!r}: {exc} (use ISO 8601 or epoch milliseconds)."
            ) from None

    def address(self, name: str) -> AddressFilter | None:
        """A client IP in any notation, a network in CIDR notation, or another text matched as
        stored (`AddressFilter`). None given: None."""
        raw = self.one(name)
        if raw is None:
            return None
        try:
            return AddressFilter.parse(raw)
        except ValueError as exc:
            raise bad_request("invalid_parameter", f"{name!r} {exc}.") from None

    def cursor(self, kind: str, types: tuple[Any, ...]) -> tuple[Any, ...] | None:
        raw = self.query.get("cursor")
        if raw is None:
            return None
        try:
            return decode_cursor(self.cursor_kind(kind), raw, types)
        except CursorError as exc:
            raise bad_request("invalid_cursor", str(exc)) from None

    def cursor_kind(self, kind: str) -> str:
        """`kind` bound to this list's object and filters: a cursor of one user's history, or
        of other filters, would silently skip what sorts before it (limit and format aside)."""
        query = sorted(
            (name, value)
            for name, value in self.query.multi_items()
            if name not in ("cursor", "limit", "format")
        )
        scope = json.dumps([self.request.url.path, query])
        return f"{kind}:{hashlib.sha256(scope.encode()).hexdigest()[:16]}"

    def export_format(self) -> str | None:
        """`csv` or `ndjson` when an export is asked for (by `format` or `Accept`), else None."""
        chosen = self.query.get("format")
        if chosen is not None:
            if chosen not in ("json", "csv", "ndjson"):
                raise bad_request("invalid_format", "'format' must be json, csv or ndjson.")
            return None if chosen == "json" else chosen
        return preferred_format(self.request.headers.get("accept", ""))


# What each representation is asked for as, in order of preference at equal quality.
FORMAT_OF_MEDIA_TYPE = {
    "application/json": None,
    "text/csv": "csv",
    "application/x-ndjson": "ndjson",
}


def preferred_format(accept: str) -> str | None:
    """The representation `Accept` prefers, by q-value (RFC 9110 12.5.1): each type takes the q
    of the most specific range that names it (`text/csv`, then `text/*`, then `*/*`); q=0 refuses
    it. JSON at a tie, and when nothing listed is one of these."""
    qualities: dict[str, float] = {}
    for item in accept.lower().split(","):
        media_range, *parameters = (part.strip() for part in item.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                if not 0.0 <= quality <= 1.0:  # NaN too
                    quality = 0.0
        if media_range:
            qualities[media_range] = max(quality, qualities.get(media_range, 0.0))
    best: tuple[float, str | None] = (0.0, None)
    for media_type, chosen in FORMAT_OF_MEDIA_TYPE.items():
        family = media_type.split("/")[0]
        for media_range in (media_type, f"{family}/*", "*/*"):
            if media_range in qualities:
                if qualities[media_range] > best[0]:
                    best = (qualities[media_range], chosen)
                break
    return best[1]


# -- rendering ----------------------------------------------------------------------------------


def iso(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return format_time(value)
    return None


def render_event(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": event["id"],
        "position": event["position"],
        "type": event["type"],
        "subject": {"id": event["subject_id"], "object": event["subject_object"]},
        "occurred_at": iso(event["occurred_at"]),
        "received_at": iso(event["received_at"]),
        "instance_id": event["instance_id"],
        "actor": event["actor"],
        "data": redact(event["data"], event["type"]),
    }


def render_changes(object_type: str, changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "field": change["field"],
            "from": redact_change(object_type, change["field"], change["from"]),
            "to": redact_change(object_type, change["field"], change["to"]),
        }
        for change in changes or []
    ]


def render_history(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "position": entry["position"],
        "event_id": entry["event_id"],
        "type": entry["type"],
        "occurred_at": iso(entry["occurred_at"]),
        "actor": entry["actor"],
        "stale": entry["stale"],
        "changes": render_changes(entry["object_type"], entry["changes"]),
        "object": {"id": entry["object_id"], "type": entry["object_type"]},
    }


def render_change(change: dict[str, Any]) -> dict[str, Any]:
    object_type, field = change["object_type"], change["field"]
    return {
        "position": change["position"],
        "event_id": change["event_id"],
        "type": change["type"],
        "occurred_at": iso(change["occurred_at"]),
        "subject": {"id": change["object_id"], "object": object_type},
        "owner_id": change["owner_id"],
        "field": field,
        "from": redact_change(object_type, field, change["from"]),
        "to": redact_change(object_type, field, change["to"]),
        "actor": change["actor"],
        "stale": change["stale"],
    }


def render_session(row: dict[str, Any]) -> dict[str, Any]:
    view = row["view"]
    return redact(
        {
            "id": row["id"],
            "user_id": row["user_id"],
            "status": view.get("status"),
            "created_at": iso(view.get("created_at")),
            "ended_at": iso(view.get("ended_at")),
            "last_active_at": iso(view.get("last_active_at")),
            "latest_activity": view.get("latest_activity"),
            "actor": view.get("actor"),
            "client_id": view.get("client_id"),
        }
    )


def render_membership(row: dict[str, Any]) -> dict[str, Any]:
    view = row["view"]
    return redact(
        {
            "id": row["id"],
            "organization_id": row["organization_id"],
            "user_id": view.get("user_id"),
            "role": view.get("role"),
            "role_name": view.get("role_name"),
            "permissions": view.get("permissions"),
            "created_at": iso(view.get("created_at")),
            "updated_at": iso(view.get("updated_at")),
        }
    )


def render_invitation(row: dict[str, Any]) -> dict[str, Any]:
    view = row["view"]
    return redact(
        {
            "id": row["id"],
            "organization_id": row["organization_id"],
            "email_address": view.get("email_address"),
            "role": view.get("role"),
            "status": view.get("status"),
            "created_at": iso(view.get("created_at")),
            "updated_at": iso(view.get("updated_at")),
        },
        "organization_invitation",
    )


def render_domain(row: dict[str, Any]) -> dict[str, Any]:
    view = row["view"]
    return redact(
        {
            "id": row["id"],
            "organization_id": row["organization_id"],
            "name": view.get("name"),
            "enrollment_mode": view.get("enrollment_mode"),
            "verification": view.get("verification"),
            "created_at": iso(view.get("created_at")),
            "updated_at": iso(view.get("updated_at")),
        }
    )


def render_timeline_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return redact(
        {
            "position": entry["position"],
            "event_id": entry["event_id"],
            "type": entry["type"],
            "status": entry["status"],
            "occurred_at": iso(entry["occurred_at"]),
            "actor": entry["actor"],
            "activity": entry["activity"],
        }
    )


def render_state(object_id: str, deleted: bool, data: Any, as_of: int | None) -> dict[str, Any]:
    updated_at = data.get("updated_at") if isinstance(data, dict) else None
    return {
        "id": object_id,
        "deleted": deleted,
        "data": redact(data),
        "updated_at": iso(updated_at),
        "as_of": iso(as_of),
    }


# -- responses ----------------------------------------------------------------------------------


def log_of(request: Request) -> AuditLog:
    return request.app.state.log


def db_of(request: Request) -> Db:
    return log_of(request).db


def read_threads_of(request: Request) -> ReadThreads:
    return request.app.state.read_threads


def list_response(
    page: Page, args: Args, kind: str, render: Callable[[dict[str, Any]], dict[str, Any]]
) -> JSONResponse:
    """A page, with the cursor of the rest bound to this request's list (`Args.cursor`)."""
    next_key = page.next_key
    return JSONResponse(
        {
            "data": [render(item) for item in page.items],
            "next_cursor": encode_cursor(args.cursor_kind(kind), next_key) if next_key else None,
        }
    )


def not_ready(exc: ProjectionNotReady) -> ApiError:
    return ApiError(
        503,
        "projection_not_ready",
        f"The {exc} read model is not built yet; retry shortly.",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class JsonCell(str):
    """A cell of JSON text. It starts with `"`, `{`, `[`, a digit, a literal or the `-` of a
    number, which a spreadsheet reads as a number: never a formula, so never prefixed (a
    prefixed `-5` was no longer JSON)."""


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula."""
    if (
        isinstance(value, str)
        and value[:1] in ("=", "+", "-", "@", "\t", "\r")
        and not isinstance(value, JsonCell)
    ):
        return "'" + value
    return value


# A CSV export's columns: each a name and what it takes from a rendered item.
Columns = list[tuple[str, Callable[[dict[str, Any]], Any]]]


def export(
    request: Request,
    fmt: str,
    name: str,
    fetch: Callable[[tuple[Any, ...] | None, int], Page],
    after: tuple[Any, ...] | None,
    render: Callable[[dict[str, Any]], dict[str, Any]],
    columns: Columns,
) -> Response:
    """Stream every item from `after` on, reading one keyset page of rows at a time."""
    headers = {"Content-Disposition": f'attachment; filename="{name}.{fmt}"'}
    media_type = EXPORT_TYPES[fmt]
    if request.method == "HEAD":
        # A streamed GET has no length to announce: no `Content-Length: 0` either (QA).
        response = Response(media_type=media_type, headers=headers)
        del response.headers["content-length"]
        return response
    first = fetch(after, EXPORT_PAGE_ROWS)  # failures before the first byte get a real status
    db = db_of(request)

    def chunks() -> Iterator[str]:
        page = first
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        if fmt == "csv":
            writer.writerow([column for column, _ in columns])
        while True:
            for item in page.items:
                rendered = render(item)
                if fmt == "csv":
                    writer.writerow([csv_cell(cell(rendered)) for _, cell in columns])
                else:
                    buffer.write(dumps(rendered))
                    buffer.write("\n")
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            key = page.next_key
            if key is None:
                return
            # As a handler's first query (endpoint_view): once more after a lost connection.
            page = db.once_more_if_lost(functools.partial(fetch, key, EXPORT_PAGE_ROWS))

    rest = chunks()
    # The first page rendered here, in the handler's read thread: it needs no other, so it
    # cannot miss a deadline once the status is sent.
    head = next(rest)
    read_threads = read_threads_of(request)

    async def body() -> AsyncIterator[str]:
        yield head
        if first.next_key is not None:  # else `rest` reads nothing more: no thread to wait for
            async for chunk in read_threads.chunks(rest, READ_SECONDS):
                yield chunk

    return ExportResponse(body(), media_type=media_type, headers=headers)


def _json_cell(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda item: JsonCell(dumps(item[key]))


def _actor_cells() -> Columns:
    return [
        (f"actor_{key}", lambda item, key=key: (item["actor"] or {}).get(key))
        for key in ("ip", "user_agent", "user_id", "impersonator")
    ]


EVENT_COLUMNS: Columns = [
    ("id", lambda item: item["id"]),
    ("position", lambda item: item["position"]),
    ("type", lambda item: item["type"]),
    ("subject_id", lambda item: item["subject"]["id"]),
    ("subject_object", lambda item: item["subject"]["object"]),
    ("occurred_at", lambda item: item["occurred_at"]),
    ("received_at", lambda item: item["received_at"]),
    ("instance_id", lambda item: item["instance_id"]),
    *_actor_cells(),
    ("data", _json_cell("data")),
]

CHANGE_COLUMNS: Columns = [
    ("position", lambda item: item["position"]),
    ("event_id", lambda item: item["event_id"]),
    ("type", lambda item: item["type"]),
    ("occurred_at", lambda item: item["occurred_at"]),
    ("subject_id", lambda item: item["subject"]["id"]),
    ("subject_object", lambda item: item["subject"]["object"]),
    ("owner_id", lambda item: item["owner_id"]),
    ("field", lambda item: item["field"]),
    ("from", _json_cell("from")),
    ("to", _json_cell("to")),
    *_actor_cells(),
    ("stale", lambda item: "true" if item["stale"] else "false"),
]


# -- handlers -----------------------------------------------------------------------------------


def list_events(request: Request, args: Args) -> Response:
    log = log_of(request)
    db = log.db
    filters = EventFilters(
        types=TypeFilter.parse(args.many("type")),
        subject=args.one("subject"),
        since=args.time("since"),
        until=args.time("until"),
    )
    after = args.cursor("events", (int,))
    fmt = args.export_format()
    limit = args.limit()
    if fmt is None:
        return list_response(
            queries.events_page(log, filters, after=after, limit=limit),
            args,
            "events",
            render_event,
        )
    upto = queries.last_event_position(db)
    return export(
        request,
        fmt,
        "events",
        lambda key, n: queries.events_page(log, filters, after=key, limit=n, upto=upto),
        after,
        render_event,
        EVENT_COLUMNS,
    )


def get_event(request: Request, args: Args) -> Response:
    svix_id = args.path("svix_id")
    event = queries.event_by_id(log_of(request), svix_id)
    if event is None:
        raise not_found(f"No event {svix_id[:80]!r}.")
    return JSONResponse(render_event(event))


def _state(request: Request, args: Args, kind: str) -> Response:
    object_id = args.path("user_id" if kind == "user" else "org_id")
    label = "user" if kind == "user" else "organization"
    as_of = args.time("as_of")
    log = log_of(request)
    if as_of is not None:
        view = _view_as_of(request, label, object_id, as_of)
        if not has_versions(view):
            known = view["first_seen_at"] is not None  # its sessions, say, by then
            raise _no_state(label, object_id, known=known, as_of=as_of)
        return JSONResponse(render_state(object_id, view["deleted"], view["data"], as_of))
    db = db_of(request)
    table = "users" if kind == "user" else "organizations"
    row = queries.current_object(db, table, object_id)
    if row is None:
        behind = reads_behind(db, "objects")
        # Again: an object applied between the two reads is not among those `behind` counts.
        row = queries.current_object(db, table, object_id)
        if row is None:
            # Only an object with an event not applied yet may be missing for that reason: on a
            # busy store the read model is nearly always a few deliveries behind.
            if behind is not None and (log.last_position(kind, object_id) or 0) > behind.applied:
                raise _not_yet(label, object_id, behind, " as_of reads the store itself.")
            raise _no_state(label, object_id, known=queries.is_known_id(db, object_id))
    view = row["view"] or {}
    return JSONResponse(render_state(object_id, row["deleted"], view.get("data"), None))


def _view_as_of(request: Request, label: str, object_id: str, as_of: int) -> dict[str, Any]:
    """A user's or an organization's view as of `as_of`, folded from its stream (`label`:
    "user" or "organization"); 404 when it has no stream."""
    log = log_of(request)
    try:
        if label == "user":
            return log.user_state(object_id, as_of=as_of).view()
        return log.organization_state(object_id, as_of=as_of).view()
    except AggregateNotFoundError:
        raise _no_state(label, object_id, known=False, as_of=as_of) from None


def _no_state(label: str, object_id: str, *, known: bool, as_of: int | None = None) -> ApiError:
    """404; for an id other events concern (`known`: a user of a store begun after the user was
    created, known so far by their sessions), with where those events are."""
    shown = object_id[:80]
    then = "" if as_of is None else f" as of {format_time(as_of)}"
    if not known:
        return not_found(f"No {label} {shown!r}{then}.")
    family = "user" if label == "user" else "organization"
    return not_found(
        f"No {family}.* event is recorded for {shown!r}{then}, so its state is unknown; other"
        f" events concern it: /v1/events?subject={shown}."
    )


def _not_yet(label: str, object_id: str, behind: Behind, hint: str = "") -> ApiError:
    """404 while the read model asked is catching up with the store (a version's build, or a
    burst being applied): the object may be among the deliveries not applied yet."""
    building = "" if behind.building is None else f"; version {behind.building} is being built"
    return not_found(
        f"No {label} {object_id[:80]!r} in the read model, which is behind the store (applied"
        f" up to position {behind.applied} of {behind.stored}{building}): it may be among the"
        f" deliveries not applied yet.{hint} The lag is at /v1/projections."
    )


def get_user(request: Request, args: Args) -> Response:
    return _state(request, args, "user")


def get_organization(request: Request, args: Args) -> Response:
    return _state(request, args, "organization")


def _require_known(
    request: Request, page: Page, args: Args, table: str, object_id: str, label: str
) -> None:
    """An empty first page of a sub-collection of an id nobody ever mentioned is a 404."""
    if page.items or "cursor" in args.query:
        return
    db = db_of(request)

    def known() -> bool:
        return queries.current_object(db, table, object_id) is not None or queries.is_known_id(
            db, object_id
        )

    if known():
        return
    behind = reads_behind(db, "events")  # what `is_known_id` reads
    if known():  # applied between the two reads: not among those `behind` counts
        return
    if behind is not None and log_of(request).pending_deliveries_concern(behind.applied, object_id):
        raise _not_yet(label, object_id, behind)
    raise not_found(f"No {label} {object_id[:80]!r}.")


def _history(request: Request, args: Args, kind: str) -> Response:
    db = db_of(request)
    object_id = args.path("user_id" if kind == "user" else "org_id")
    page = queries.history_page(
        db,
        by="object_id" if kind == "user" else "owner_id",
        clerk_id=object_id,
        after=args.cursor(f"{kind}-history", (int, str)),
        limit=args.limit(),
        since=args.time("since"),
        until=args.time("until"),
    )
    table = "users" if kind == "user" else "organizations"
    _require_known(request, page, args, table, object_id, kind)
    return list_response(page, args, f"{kind}-history", render_history)


def user_history(request: Request, args: Args) -> Response:
    return _history(request, args, "user")


def organization_history(request: Request, args: Args) -> Response:
    return _history(request, args, "organization")


def _owned(
    request: Request,
    args: Args,
    *,
    parent: str,
    table: str,
    by: str,
    include_deleted: bool,
    render: Callable[[dict[str, Any]], dict[str, Any]],
) -> Response:
    db = db_of(request)
    object_id = args.path("user_id" if parent == "user" else "org_id")
    kind = f"{parent}-{table}"
    as_of = args.time("as_of")
    if as_of is not None:
        page = _owned_as_of(request, args, parent, table, object_id, as_of, include_deleted)
        return list_response(page, args, f"{kind}-as-of", render)
    try:
        page = queries.owned_objects(
            db,
            table,
            by=by,
            owner=object_id,
            after=_owned_cursor(args, kind),
            limit=args.limit(),
            include_deleted=include_deleted,
        )
    except queries.OrderChanged:
        raise bad_request(
            "invalid_cursor",
            "This list's order changed with an upgrade since the cursor was made; walk it"
            " again from the start.",
        ) from None
    parent_table = "users" if parent == "user" else "organizations"
    _require_known(request, page, args, parent_table, object_id, parent)
    return list_response(page, args, kind, render)


def _owned_cursor(args: Args, kind: str) -> tuple[Any, ...] | None:
    """A current-state list's cursor: (order, key, id). One of the release before `objects`
    v11 has no order, and is of creation order: during a rolling upgrade, while that
    generation still serves, a walk begun on an older process goes on here."""
    try:
        return args.cursor(kind, (int, (int, type(None)), str))
    except ApiError:
        before_v11 = args.cursor(kind, ((int, type(None)), str))
        assert before_v11 is not None  # there is a cursor: the first read refused it
        return (queries.LISTED_FROM_VERSION - 1, *before_v11)


# The list of a user's or an organization's view (`state.view()`) each table's rows are in.
VIEW_LIST_OF_TABLE = {
    "sessions": "sessions",
    "memberships": "members",
    "invitations": "invitations",
    "domains": "domains",
}


def _owned_as_of(
    request: Request,
    args: Args,
    parent: str,
    table: str,
    object_id: str,
    as_of: int,
    include_deleted: bool,
) -> queries.Page:
    """A sub-collection as of `as_of`, from the user's or organization's stream folded up to
    then, as `as_of` rebuilds their state: the same items, shapes and order (creation) a
    current list has, except that the organization's stream does not hold its members' users'
    deletions."""
    if parent == "user" and table == "memberships":
        rows = _memberships_of_user_as_of(request, object_id, as_of)
    else:
        view = _view_as_of(request, parent, object_id, as_of)
        if view["first_seen_at"] is None:  # nothing of it had happened by then
            raise _no_state(parent, object_id, known=False, as_of=as_of)
        items = view[VIEW_LIST_OF_TABLE[table]]
        if not include_deleted:
            gone = table == "domains" and view["deleted"]  # the view keeps those, flagged
            items = [item for item in items if not gone and not item.get("deleted")]
        owner = "user_id" if parent == "user" else "organization_id"
        rows = [{"id": item["id"], owner: object_id, "view": item} for item in items]
    return queries.sorted_page(
        rows,
        lambda row: created_sort_key(row["view"]),
        after=args.cursor(f"{parent}-{table}-as-of", (int, str)),
        limit=args.limit(),
    )


def _memberships_of_user_as_of(request: Request, user_id: str, as_of: int) -> list[dict[str, Any]]:
    """A user's memberships as of `as_of`: a membership is its organization's (SPEC 3), so each
    organization the user is or was a member of is folded up to then, as `as_of` rebuilds its
    members; none of an organization deleted by then."""
    try:
        user = _view_as_of(request, "user", user_id, as_of)
    except ApiError:
        user = None  # known from memberships only (a store begun after its creation, say)
    if user is not None and user["deleted"]:
        return []
    # Each membership once, as its newest version across organizations has it (a membership
    # re-sent under another organization, never by Clerk, was listed from each one's fold):
    # its version's order, whether it or its organization is deleted, and the row.
    newest: dict[str, tuple[OrderKey, bool, dict[str, Any]]] = {}
    member_by_then = False  # of any organization, though removed or its organization deleted
    log = log_of(request)
    for organization_id in queries.membership_organizations(db_of(request), user_id):
        try:
            state = log.organization_state(organization_id, as_of=as_of)
        except AggregateNotFoundError:
            continue  # nothing of it had happened by then
        organization_deleted = state.organization.deleted
        for key, member in state.memberships_in_order():
            member_by_then = member_by_then or member["user_id"] == user_id
            held = newest.get(member["id"])
            if held is None or key > held[0]:
                row = {"id": member["id"], "organization_id": organization_id, "view": member}
                newest[member["id"]] = (key, organization_deleted or member["deleted"], row)
    if not member_by_then and (user is None or user["first_seen_at"] is None):
        raise _no_state("user", user_id, known=False, as_of=as_of)  # nothing of them by then
    # Removed ones, and those of a deleted organization, weighed all the same: a newest version
    # removed, or in an organization deleted since, left it listed where it had been (review).
    rows = [
        row
        for _, gone, row in newest.values()
        if not gone and row["view"].get("user_id") == user_id
    ]
    # In creation order across organizations, as one organization's members are.
    return sorted(rows, key=lambda row: created_sort_key(row["view"]))


def user_sessions(request: Request, args: Args) -> Response:
    return _owned(
        request,
        args,
        parent="user",
        table="sessions",
        by="owner_id",
        include_deleted=True,
        render=render_session,
    )


def user_organizations(request: Request, args: Args) -> Response:
    return _owned(
        request,
        args,
        parent="user",
        table="memberships",
        by="user_id",
        include_deleted=False,
        render=render_membership,
    )


def organization_members(request: Request, args: Args) -> Response:
    return _owned(
        request,
        args,
        parent="organization",
        table="memberships",
        by="owner_id",
        include_deleted=False,
        render=render_membership,
    )


def organization_invitations(request: Request, args: Args) -> Response:
    return _owned(
        request,
        args,
        parent="organization",
        table="invitations",
        by="owner_id",
        include_deleted=False,  # none are deleted (revoked is a status); their organization may be
        render=render_invitation,
    )


def organization_domains(request: Request, args: Args) -> Response:
    return _owned(
        request,
        args,
        parent="organization",
        table="domains",
        by="owner_id",
        include_deleted=False,
        render=render_domain,
    )


def session_timeline(request: Request, args: Args) -> Response:
    db = db_of(request)
    session_id = args.path("session_id")
    page = queries.session_timeline(
        db,
        session_id,
        after=args.cursor("timeline", (int, int, int, int)),
        limit=args.limit(),
        since=args.time("since"),
        until=args.time("until"),
    )
    _require_known(request, page, args, "sessions", session_id, "session")
    return list_response(page, args, "timeline", render_timeline_entry)


def list_changes(request: Request, args: Args) -> Response:
    db = db_of(request)
    filters = ChangeFilters(
        subject=args.one("subject"),
        fields=tuple(dict.fromkeys(args.many("field"))),
        types=TypeFilter.parse(args.many("type")),
        actor_ip=args.address("actor_ip"),
        since=args.time("since"),
        until=args.time("until"),
    )
    after = args.cursor("changes", (int, str, str))
    fmt = args.export_format()
    limit = args.limit()
    if fmt is None:
        return list_response(
            queries.changes_page(db, filters, after=after, limit=limit),
            args,
            "changes",
            render_change,
        )
    upto = queries.last_change_position(db)
    return export(
        request,
        fmt,
        "changes",
        lambda key, n: queries.changes_page(db, filters, after=key, limit=n, upto=upto),
        after,
        render_change,
        CHANGE_COLUMNS,
    )


def list_projections(request: Request, args: Args) -> Response:
    projector = getattr(request.app.state, "projector", None)
    if projector is None:
        raise ApiError(
            503,
            "projections_unavailable",
            "This process does not run projections, so it cannot report on them.",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    # A list as every list is, for clients that walk lists alike: by name.
    by_name = sorted(projector.status(), key=lambda row: row["name"])
    page = queries.sorted_page(
        by_name,
        lambda row: (row["name"],),
        after=args.cursor("projections", (str,)),
        limit=args.limit(),
    )
    return list_response(page, args, "projections", dict)


# -- the route table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    path: str  # under /v1
    handler: Callable[[Request, Args], Response]
    summary: str
    description: str
    params: tuple[Param, ...]
    schema: str  # the component schema of the answer (of one item, for lists)
    is_list: bool = False
    export_columns: Columns | None = None  # a CSV export's; None: not exportable

    @property
    def exportable(self) -> bool:
        return self.export_columns is not None

    @property
    def full_path(self) -> str:
        return "/v1" + self.path

    @property
    def route_path(self) -> str:
        """`path` as routed: a svix-id is whatever its sender chose, `/` included (a Clerk id
        is not), and is the last segment of its route, so it takes the rest of the path."""
        return self.path.replace("{svix_id}", "{svix_id:path}")

    @property
    def not_found(self) -> bool:
        return any(p.location == "path" for p in self.params)


PAGING = (LIMIT, CURSOR)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/events",
        list_events,
        "Stored events",
        "Every stored event, oldest first by store position, with filters. Add `format=csv` or "
        "`format=ndjson` (or `Accept: text/csv`) to stream the whole filtered result.",
        (TYPE, EVENT_SUBJECT, SINCE, UNTIL, *PAGING, FORMAT),
        "Event",
        is_list=True,
        export_columns=EVENT_COLUMNS,
    ),
    Endpoint(
        "/events/{svix_id}",
        get_event,
        "One event",
        "One stored event by its svix-id, with its (redacted) data.",
        (SVIX_ID,),
        "Event",
    ),
    Endpoint(
        "/users/{user_id}",
        get_user,
        "A user's state",
        "The user's current state; with `as_of`, its state as of that time, rebuilt from the "
        "event stream. A deleted user answers 200 with `deleted: true`.",
        (USER_ID, AS_OF),
        "ObjectState",
    ),
    Endpoint(
        "/users/{user_id}/history",
        user_history,
        "A user's changes",
        "Every recorded version of the user, oldest first (by store position), with the fields it "
        "changed, who changed them, and whether it arrived stale (older than the state it found).",
        (USER_ID, SINCE, UNTIL, *PAGING),
        "HistoryEntry",
        is_list=True,
    ),
    Endpoint(
        "/users/{user_id}/sessions",
        user_sessions,
        "A user's sessions",
        "The user's sessions (ended ones included), in the order they were recorded, with status "
        "and last activity (device, browser, IP, city, country).",
        (USER_ID, AS_OF_LIST, *PAGING),
        "Session",
        is_list=True,
    ),
    Endpoint(
        "/users/{user_id}/organizations",
        user_organizations,
        "A user's organizations",
        "The user's current organization memberships, with role, in the order they were recorded"
        " (none of deleted organizations, none once the user is deleted); with `as_of`, those"
        " of that time, each organization rebuilt from its stream.",
        (USER_ID, AS_OF_LIST, *PAGING),
        "Membership",
        is_list=True,
    ),
    Endpoint(
        "/sessions/{session_id}/timeline",
        session_timeline,
        "A session's timeline",
        "The session's events in occurred_at order, with status, actor and activity (an event"
        " whose delivery had no timestamp: where it was received, with occurred_at null). A"
        " walk takes the events stored when it began in that order, then those stored since"
        " (a late delivery of an earlier event, say) in the order they were stored.",
        (SESSION_ID, SINCE, UNTIL, *PAGING),
        "TimelineEntry",
        is_list=True,
    ),
    Endpoint(
        "/organizations/{org_id}",
        get_organization,
        "An organization's state",
        "The organization's current state; with `as_of`, its state as of that time, rebuilt from "
        "the event stream. A deleted organization answers 200 with `deleted: true`.",
        (ORG_ID, AS_OF),
        "ObjectState",
    ),
    Endpoint(
        "/organizations/{org_id}/members",
        organization_members,
        "An organization's members",
        "Current memberships, with role, in the order they were recorded: none of a deleted"
        " organization, nor deleted ones or those of deleted users. With `as_of`, from the"
        " organization's stream, which does not hold its members' users' deletions: a member"
        " whose user was deleted by then is listed unless the membership's deletion was too.",
        (ORG_ID, AS_OF_LIST, *PAGING),
        "Membership",
        is_list=True,
    ),
    Endpoint(
        "/organizations/{org_id}/invitations",
        organization_invitations,
        "An organization's invitations",
        "Invitations with their status (pending, accepted, revoked), in the order they were "
        "recorded; none of a deleted organization. Invitation URLs are never shown.",
        (ORG_ID, AS_OF_LIST, *PAGING),
        "Invitation",
        is_list=True,
    ),
    Endpoint(
        "/organizations/{org_id}/domains",
        organization_domains,
        "An organization's domains",
        "Current domains (none if the organization is deleted), with enrollment mode and"
        " verification status.",
        (ORG_ID, AS_OF_LIST, *PAGING),
        "Domain",
        is_list=True,
    ),
    Endpoint(
        "/organizations/{org_id}/history",
        organization_history,
        "An organization's changes",
        "Changes to the organization and to its memberships, invitations and domains, oldest "
        "first (by store position).",
        (ORG_ID, SINCE, UNTIL, *PAGING),
        "HistoryEntry",
        is_list=True,
    ),
    Endpoint(
        "/changes",
        list_changes,
        "Field-level changes",
        "Every changed field of every versioned object (users, sessions, organizations,"
        " memberships, invitations, domains, roles, permissions), one item per field, by store"
        " position. Add "
        "`format=csv` or `format=ndjson` (or `Accept: text/csv`) to stream the whole filtered "
        "result.",
        (CHANGE_SUBJECT, FIELD, TYPE, SINCE, UNTIL, ACTOR_IP, *PAGING, FORMAT),
        "Change",
        is_list=True,
        export_columns=CHANGE_COLUMNS,
    ),
    Endpoint(
        "/projections",
        list_projections,
        "Projection status",
        "Each projection: name, schema version, position, lag (events behind the store), state "
        "(`live` or `rebuilding`) and the count of events it failed on, by name.",
        PAGING,
        "Projection",
        is_list=True,
    ),
)


def endpoint_view(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    def respond(request: Request) -> Response:
        args = Args(request, endpoint)
        try:
            response = db_of(request).once_more_if_lost(lambda: endpoint.handler(request, args))
        except ProjectionNotReady as exc:
            raise not_ready(exc) from None
        if endpoint.exportable:  # JSON, CSV or NDJSON by `Accept`: caches must key on it
            response.headers["Vary"] = "Accept"
        return response

    async def view(request: Request) -> Response:
        return await read_threads_of(request).run(functools.partial(respond, request), READ_SECONDS)

    view.__name__ = endpoint.handler.__name__
    view.__doc__ = endpoint.description
    return view


def read_router() -> Router:
    return Router(
        routes=[
            Route(endpoint.route_path, endpoint_view(endpoint), methods=["GET"])
            for endpoint in ENDPOINTS
        ],
        redirect_slashes=False,  # as the app's own router (api.app)
    )


def read_routes() -> list[BaseRoute]:
    """Everything this module serves: `/v1` behind the bearer token, and the API's documentation."""
    from api.openapi import openapi_routes

    return [Mount("/v1", app=BearerAuth(read_router())), *openapi_routes()]
