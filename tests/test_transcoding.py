"""The store's transcoder reads every record exactly as eventsourcing's `JSONTranscoder` does."""

from __future__ import annotations

import tempfile
from datetime import UTC
from typing import Any

import pytest
from eventsourcing.persistence import JSONTranscoder
from hypothesis import given
from hypothesis import strategies as st

from audit.application import AuditLog
from audit.config import parse_database_url
from audit.transcoding import MAX_DEPTH, StoreTranscoder


def transcoders() -> tuple[JSONTranscoder, StoreTranscoder]:
    """eventsourcing's transcoder and the application's own, with the application's
    transcodings registered on both."""
    with tempfile.TemporaryDirectory() as directory:
        log = AuditLog(parse_database_url(f"sqlite:///{directory}/store.db"))
        reference = JSONTranscoder()
        log.register_transcodings(reference)
        store = log.mapper.transcoder
        log.close()
    assert isinstance(store, StoreTranscoder)
    return reference, store


REFERENCE, STORE = transcoders()

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**90), max_value=2**90)
    | st.floats()  # NaN and infinities too: `json` writes and reads them
    | st.text()
    | st.datetimes(timezones=st.just(UTC))
    | st.uuids()
    | st.decimals(allow_nan=False)
    # What a payload may hold that looks like an encoded value: decoded alike, or refused alike.
    | st.fixed_dictionaries({"_type_": st.sampled_from(["uuid_hex", "other"]), "_data_": st.text()})
)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=25,
)
records = st.dictionaries(st.text(), values)


def read_with(transcoder: JSONTranscoder, data: bytes) -> str:
    """What `transcoder` reads, or the error it raises, as text that tells types apart."""
    try:
        return repr(transcoder.decode(data))
    except Exception as exc:
        return f"{type(exc).__name__}"


@given(record=records)
def test_reads_what_json_transcoder_reads(record: dict[str, Any]) -> None:
    data = REFERENCE.encode(record)
    assert read_with(STORE, data) == read_with(REFERENCE, data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1180591620717411303424}',  # beyond 64 bits: orjson would make it a float
        b'{"a": [-9223372036854775809]}',
        b'{"a": NaN, "b": -Infinity}',
        b'{"a": 1E400}',
        b'{"a": "\\ud800"}',
        b'{"a": 1.5, "b": -0.0, "c": -0}',
        b'{"t": {"_type_": "datetime_iso", "_data_": "2024-05-28T08:00:00+00:00"}}',
        b'{"u": [{"_type_": "uuid_hex", "_data_": "0123456789abcdef0123456789abcdef"}]}',
        b'{"x": {"_type_": "unregistered", "_data_": 1}}',
        b'[1, {"_type_": "decimal_str", "_data_": "1.10"}]',
        b'"not a record"',
        b'{"a": 1, "a": 2}',
        b"\xff",
    ],
)
def test_what_orjson_would_read_otherwise(data: bytes) -> None:
    assert read_with(STORE, data) == read_with(REFERENCE, data)


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 900])
def test_deep_nesting_reads_alike(depth: int) -> None:
    data = b'{"a": ' + b'{"b": ' * depth + b"1" + b"}" * depth + b"}"
    assert read_with(STORE, data) == read_with(REFERENCE, data)
