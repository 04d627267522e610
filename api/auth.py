"""Bearer-token authentication for the read API (`/v1`).

Tokens come from `AUDIT_API_TOKENS` (the app's settings, read per request). Each presented token is
compared with every configured one in constant time; no token configured means nobody gets in.
Only the `Authorization` header counts: a token in the URL would end up in access logs and browser
history, so it is refused with a message saying so. Tokens are never logged.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="clerk-audit"'}
# Query parameters people put tokens in; their presence is answered with a pointed message.
URL_TOKEN_PARAMETERS = ("access_token", "token", "api_token", "bearer")


def bearer_token(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_is_valid(presented: str | None, accepted: tuple[str, ...]) -> bool:
    if presented is None:
        return False
    given = presented.encode()
    valid = False
    for token in accepted:  # no early exit: the time taken does not depend on which one matched
        valid |= hmac.compare_digest(given, token.encode())
    return valid


def check_bearer(scope: Scope) -> None:
    """Raise a 401 ApiError unless the request carries a valid bearer token."""
    settings = scope["app"].state.settings
    accepted: tuple[str, ...] = tuple(settings.api_tokens) if settings is not None else ()
    headers = Headers(scope=scope)
    presented = bearer_token(headers)
    if token_is_valid(presented, accepted):
        return
    if not accepted:
        message = "The read API has no tokens configured (AUDIT_API_TOKENS); nobody is accepted."
    elif presented is None and any(
        name in QueryParams(scope.get("query_string", b"")) for name in URL_TOKEN_PARAMETERS
    ):
        message = "Tokens are not accepted in the URL; send 'Authorization: Bearer <token>'."
    elif presented is None:
        message = "This endpoint needs 'Authorization: Bearer <token>'."
    else:
        message = "The bearer token is not valid."
    raise ApiError(401, "unauthorized", message, dict(CHALLENGE))


class BearerAuth:
    """ASGI wrapper: every HTTP request to the wrapped app must carry a valid bearer token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @property
    def routes(self) -> list:
        """The wrapped router's routes (so a Mount of this app lists them, for url_for and docs)."""
        return list(getattr(self.app, "routes", []))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            check_bearer(scope)
        await self.app(scope, receive, send)
