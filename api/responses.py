"""The API's responses: JSON encoded by `audit.jsontext` (orjson, several times faster than
`json` on list pages), and exports that a store failure cuts visibly."""

from __future__ import annotations

import logging
from typing import Any

from starlette import responses
from starlette.types import Send

from audit.jsontext import dumps_bytes
from audit.storage import StoreUnavailable

log = logging.getLogger("audit.api")


class JSONResponse(responses.JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps_bytes(content)


class ExportResponse(responses.StreamingResponse):
    """A streamed export. When the store fails after the first chunk (a lost connection, a
    missed deadline), the export ends without its last chunk: the server closes the
    connection and the client sees the download cut, never a clean end. A warning is logged
    (and uvicorn's one line that the response did not complete), where a raised error was
    logged as unexpected, with two tracebacks."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except StoreUnavailable as exc:
            log.warning("export cut: the event store is unavailable: %s", exc)
