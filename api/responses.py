"""The API's JSON response: Starlette's, encoded by `audit.jsontext` (orjson, several times
faster than `json` on list pages)."""

from __future__ import annotations

from typing import Any

from starlette import responses

from audit.jsontext import dumps_bytes


class JSONResponse(responses.JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps_bytes(content)
