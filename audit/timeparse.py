"""Time parsing and formatting, in one place: ISO 8601 or epoch milliseconds in, ISO UTC out."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache


class TimeParseError(ValueError):
    pass


_EPOCH = datetime(1970, 1, 1)  # naive UTC: its isoformat has no offset to strip
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)
_ONE_MILLISECOND = timedelta(milliseconds=1)

# An offset's `+` sent unencoded in a query string arrives as a space (`…T10:00:00 02:00`).
# Only a whole offset (`HH:MM`, `HHMM`, `HH`) after a time with its minutes: `…T14 05` is not
# read as one.
_OFFSET_PLUS_DECODED = re.compile(
    r"(\d{4}-?\d\d-?\d\dT\d\d:?\d\d(?::?\d\d(?:[.,]\d+)?)?) (\d\d(?::?\d\d)?)"
)
# The digits of a fraction of a second past the microsecond, which `fromisoformat` drops: a
# time with any of them not zero is after the microsecond it is read as.
_BELOW_MICROSECOND = re.compile(r"[.,]\d{6}\d*[1-9]")

# Epoch milliseconds of 10000-01-01: later (or negative, or boolean) "times" are not times.
MAX_EPOCH_MS = 253_402_300_800_000
# Epoch milliseconds of 0001-01-01, the first time `format_time` can write.
MIN_EPOCH_MS = -62_135_596_800_000


def epoch_ms(value: object) -> int | None:
    """`value` if it is a plausible epoch-milliseconds time, else None.

    Payload times are whatever the sender wrote; a number past int64 would not even fit the
    BIGINT columns the projections index them in.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_EPOCH_MS:
        return value
    return None


def parse_time(value: str, *, round_up: bool = False) -> int:
    """Epoch milliseconds from ISO 8601 (`2024-05-28T08:06:40.018Z`) or epoch milliseconds.

    A finer ISO time falls between two milliseconds: the earlier one, or with `round_up` the
    later (a bound that excludes what is before it: `since=…40.0185Z` took an event at …40.018).

    Only times `format_time` can write (years 1 to 9999): an `as_of` past them was answered
    as of the end of the stream, its time written back as null, as a current state is."""
    text = value.strip()
    if (decoded := _OFFSET_PLUS_DECODED.fullmatch(text)) is not None:
        text = f"{decoded[1]}+{decoded[2]}"
    millis: int | None
    if text.isascii() and text.removeprefix("-").isdigit():  # "²".isdigit(), yet int("²") fails
        # Twenty digits are out of range already; int() of thousands is slow, or refused.
        millis = int(text) if len(text) <= 20 else None
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise TimeParseError(
                f"{value[:40]!r} is neither ISO 8601 nor epoch milliseconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        # Whole milliseconds by integer arithmetic: `timestamp() * 1000` goes through a float,
        # which put some times a millisecond early (…55.695 read as …55.694).
        elapsed = moment - _EPOCH_UTC
        millis = elapsed // _ONE_MILLISECOND
        if round_up and (elapsed % _ONE_MILLISECOND or _BELOW_MICROSECOND.search(text)):
            millis += 1
    if millis is None or not MIN_EPOCH_MS <= millis < MAX_EPOCH_MS:
        raise TimeParseError(f"{value[:40]!r} is out of range (years 1 to 9999)")
    return millis


@lru_cache(maxsize=4096)  # a page's rows share their events' times: 10 changes of one event
def format_time(millis: int | None) -> str | None:
    """ISO 8601 UTC with milliseconds, as every API time is written."""
    if millis is None:
        return None
    try:
        moment = _EPOCH + timedelta(milliseconds=millis)
    except OverflowError:
        return None
    return moment.isoformat(timespec="milliseconds") + "Z"  # isoformat: C, unlike strftime
