"""JSON text in and out, in one place: orjson where it can, the standard library where it cannot.

orjson encodes and decodes several times faster than `json`. It refuses integers beyond 64 bits
(and keys that are not strings), which a payload may carry since JSON numbers have no limit:
those values fall back to `json`, whose text means the same. Reading, orjson takes such integers
for floats, which would change the data; text that may hold one is read by `json`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# An integer of 19 digits or more may be beyond 64 bits (a longer run in a string or a fraction
# only costs the slower reader). Found by mapping every digit to "0" and looking for 19 of them:
# a regular expression took 13.6 us on a 1.5 KB body, twice what `json` takes to read it.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 19


def dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON text, non-ASCII characters as themselves."""
    return dumps_bytes(value, sort_keys=sort_keys).decode()


def dumps_sorted(value: Any) -> str:
    """`dumps(value, sort_keys=True)` in one call, not three: the read models write a few dozen
    values a delivery (each change's two), and the calls cost more than the writing (501 ns
    against 189 ns for a short value)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return dumps(value, sort_keys=True)


def dumps_bytes(value: Any, *, sort_keys: bool = False) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, a non-string key
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
        return text.encode()


def loads(text: str, **fallback: Any) -> Any:
    """The value of JSON text, as `json.loads(text, **fallback)` reads it.

    orjson reads it unless the text holds a long run of digits, or orjson refuses it (NaN,
    a lone surrogate, deep nesting): then `json` does, with `fallback`'s arguments, and raises
    what it raises. One difference remains: orjson reads nesting up to 1,024 levels deep where
    `json` stops a little short of 1,000; a delivery's body is read by
    `audit.aggregates.delivery.read_envelope`, which reads no level past 256 but as text.
    """
    if (
        len(text) < len(_LONG_DIGIT_RUN)  # most values in a page: too short to hold one
        or text.encode(errors="surrogatepass").translate(_DIGITS_AS_ZERO).find(_LONG_DIGIT_RUN) < 0
    ):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text, **fallback)


def is_unicode(text: str) -> bool:
    """False for text holding a lone UTF-16 surrogate (`"\ud800"`, which JSON escapes can
    carry): not Unicode, so nothing can encode, hash, index or bind it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
