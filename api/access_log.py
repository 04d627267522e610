"""The access log: method, path, status and time; never the query string or any header.

uvicorn's own access log writes the query string, where a careless client may have put its
token (refused, but then logged); `audit serve` turns that log off and uses this one.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("audit.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered = complete = False  # complete: the body's last part sent (not a cut export)

        async def send_and_note(message: Message) -> None:
            nonlocal status, answered, complete
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            elif message["type"] == "http.response.body":
                complete = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            log.info(
                "%s %s %d%s %.1fms",
                scope["method"],
                loggable_path(scope),
                status,
                " cut" if answered and not complete else "",
                (time.perf_counter() - started) * 1000,
            )


def loggable_path(scope: Scope) -> str:
    """The path as the client sent it, still percent-encoded: decoded, a `%0A` in it wrote a
    line of the client's choosing into the log (a forged entry, no token needed), and a `%00`
    made the log a binary file to grep. Anything not printable left is escaped."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else scope["path"]
    if path.isprintable():
        return path
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
