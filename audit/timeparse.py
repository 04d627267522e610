"""Time parsing and formatting, in one place: ISO 8601 or epoch milliseconds in, ISO UTC out."""

from __future__ import annotations

from datetime import UTC, datetime


class TimeParseError(ValueError):
    pass


def parse_time(value: str) -> int:
    """Epoch milliseconds from ISO 8601 (`2024-05-28T08:06:40.018Z`) or epoch milliseconds."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        if len(text) > 15:
            raise TimeParseError(f"{value!r} is out of range")
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeParseError(f"{value[:40]!r} is neither ISO 8601 nor epoch milliseconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return int(moment.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        raise TimeParseError(f"{value[:40]!r} is out of range") from None


def format_time(millis: int | None) -> str | None:
    """ISO 8601 UTC with milliseconds, as every API time is written."""
    if millis is None:
        return None
    try:
        moment = datetime.fromtimestamp(millis / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis % 1000:03d}Z"
