"""One place that maps failures to HTTP statuses and the JSON error body of SPEC 2."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from api.responses import JSONResponse
from audit.storage import StoreUnavailable

log = logging.getLogger("audit.api")

RETRY_AFTER_SECONDS = 5

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    503: "store_unavailable",
}


class ApiError(Exception):
    """A failure the client should be told about, with its status and a snake_case code."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("event store unavailable: %s", exc)
    return error_response(
        503,
        "store_unavailable",
        "The event store is unavailable; retry later.",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = {
        404: "No such resource.",
        405: "This method is not allowed here.",
    }.get(exc.status_code, str(exc.detail))
    path = request.url.path
    if exc.status_code == 404 and len(path) > 1 and path.endswith("/"):
        message = f"No such resource (paths take no trailing slash: {path.rstrip('/')[:200]})."
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "An unexpected error occurred.")


EXCEPTION_HANDLERS = {
    ApiError: api_error,
    StoreUnavailable: store_unavailable,
    HTTPException: http_exception,
    Exception: unexpected,
}
