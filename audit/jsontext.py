"""JSON text out, in one place: orjson where it can, the standard library where it cannot.

orjson encodes several times faster than `json`. It refuses integers beyond 64 bits (and keys
that are not strings), which a payload may carry since JSON numbers have no limit: those values
fall back to `json`, whose text means the same. Reading stays with `json`, because orjson reads
such integers as floats, which would change the data.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON text, non-ASCII characters as themselves."""
    return dumps_bytes(value, sort_keys=sort_keys).decode()


def dumps_bytes(value: Any, *, sort_keys: bool = False) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, a non-string key
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
        return text.encode()
