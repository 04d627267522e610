"""Opaque pagination cursors, in one place: the keyset of the last item a page returned.

A cursor is the urlsafe base64 (unpadded) of a small JSON object `{"k": <kind>, "v": [...]}`.
`kind` names the list it was issued by, so a cursor of one list is refused by another instead of
silently skipping or repeating items. Clients must treat cursors as opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from audit.jsontext import is_unicode

# Room for the longest key a list issues: a change's path of 256 characters (each of up to four
# bytes in UTF-8, or six as a JSON escape of a control character) with its object's id.
# (At 1,024, a path of 117 CJK characters, escaped as `\uXXXX`, made a cursor the service then
# refused: found by QA.)
MAX_CURSOR_LENGTH = 4096


class CursorError(ValueError):
    """A cursor that this service did not issue for this list."""


def encode_cursor(kind: str, keyset: tuple[Any, ...] | list[Any]) -> str:
    document = {"k": kind, "v": list(keyset)}
    try:  # UTF-8: a quarter to half the size of `\uXXXX` escapes
        raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, as before (and refused back)
        raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str, types: tuple[type | tuple[type, ...], ...]) -> tuple:
    """The keyset inside `cursor`, checked against the value types the list expects.

    Each entry of `types` is a type (or a tuple of types) for the keyset value at that place;
    `bool` never passes for `int`. Raises CursorError on anything malformed.
    """
    if not cursor or len(cursor) > MAX_CURSOR_LENGTH:
        raise CursorError("The cursor is empty or too long.")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CursorError("The cursor is malformed.") from None
    if not isinstance(decoded, dict) or decoded.get("k") != kind:
        raise CursorError("The cursor belongs to another list, or to other filters of this one.")
    values = decoded.get("v")
    if not isinstance(values, list) or len(values) != len(types):
        raise CursorError("The cursor is malformed.")
    for value, expected in zip(values, types, strict=True):
        if isinstance(value, bool) or not isinstance(value, expected):
            raise CursorError("The cursor is malformed.")
        # Room to step past a key either way in a BIGINT; text a database can bind (no lone
        # surrogate; a NUL, which a key read from SQLite may hold, `Db.bindable` makes safe).
        if isinstance(value, int) and not -(2**62) <= value < 2**62:
            raise CursorError("The cursor is malformed.")
        if isinstance(value, str) and not is_unicode(value):
            raise CursorError("The cursor is malformed.")
    return tuple(values)
