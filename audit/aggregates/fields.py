"""Reading a Clerk payload's fields, which may hold any JSON type whatever Clerk documents."""

from __future__ import annotations

from typing import Any


def nonempty_str(value: Any) -> str | None:
    """The value if it is a non-empty string (an id, an address), else None."""
    return value if isinstance(value, str) and value else None
