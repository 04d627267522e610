"""The store's transcoder reads and writes every record exactly as eventsourcing's
`JSONTranscoder` does."""

from __future__ import annotations

import tempfile
from datetime import UTC
from typing import Any

import orjson
import pytest
from eventsourcing.persistence import JSONTranscoder, Transcoding
from hypothesis import given
from hypothesis import strategies as st

from audit.application import AuditLog
from audit.config import parse_database_url
from audit.transcoding import MAX_DEPTH, StoreTranscoder
from tests.domain_factories import payload_types, sample


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


def written_with(transcoder: JSONTranscoder, record: Any) -> bytes | str:
    """What `transcoder` writes, or the name of the error it raises."""
    try:
        return transcoder.encode(record)
    except Exception as exc:
        return type(exc).__name__


@given(record=records | st.dictionaries(st.text(), st.text(st.characters(max_codepoint=0x9F))))
def test_writes_what_json_transcoder_writes(record: dict[str, Any]) -> None:
    assert written_with(STORE, record) == written_with(REFERENCE, record)


class Name(str):
    pass


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": [value]}
    return value


@pytest.mark.parametrize(
    "record",
    [
        {"n": 2**64, "m": -(2**63) - 1},  # beyond 64 bits: orjson refuses, `json` writes
        {"f": 1e16, "g": 0.1, "h": float("nan")},
        {"s": '\x00\x1f\x7f\u2028\u2029"\\/\ud7ff\ue000\U0001f600'},
        {"s": "\ud800"},  # a lone surrogate: both refuse
        {1: "a key that is not a string", "b": {2: 3}},
        {"subclass": Name("x")},
        {"tuple": (1, ["two", (3,)])},
        {"deep": nested(40)},
        {"deeper": nested(400)},
        {"nothing": None, "empty": {}, "list": []},
    ],
)
def test_writes_what_json_transcoder_writes_at_the_edges(record: dict[Any, Any]) -> None:
    assert written_with(STORE, record) == written_with(REFERENCE, record)


class NameAsText(Transcoding):
    type = Name
    name = "name"

    def encode(self, obj: Name) -> str:
        return f"name:{obj}"

    def decode(self, data: str) -> Name:
        return Name(data.removeprefix("name:"))


def test_a_subclass_of_str_is_written_as_json_writes_it_even_with_a_transcoding() -> None:
    reference, store = JSONTranscoder(), StoreTranscoder()
    for transcoder in (reference, store):
        transcoder.register(NameAsText())
    record = {"name": Name("x"), "at": [Name("y")]}
    assert written_with(store, record) == written_with(reference, record)


def test_every_sample_is_stored_by_orjson_as_json_transcoder_writes_it(log: AuditLog) -> None:
    """Each delivery event and its marker (a time, a UUID) takes the fast path, not the
    fallback, and is stored byte for byte as `JSONTranscoder` writes it, on both backends."""
    log.record([sample(event_type) for event_type in payload_types()])
    stored = list(log.recorder.select_notifications(1, 1000))
    assert len(stored) == 2 * len(payload_types())
    for event in stored:
        record = STORE.decode(event.state)
        # The fast path alone (it raises _WriteByJson where `json` would write the record).
        assert orjson.dumps(STORE._as_json_types(record, 0)) == event.state
        assert event.state == REFERENCE.encode(record)


class Refused:
    pass


class RefusedAsNothing(Transcoding):
    type = Refused
    name = "refused"

    def encode(self, obj: Refused) -> str:
        raise RuntimeError("this transcoding refuses")

    def decode(self, data: str) -> Refused:
        return Refused()


@pytest.mark.parametrize(
    "record",
    [{(1,): Refused()}, {"a": 1, (2,): 2, "b": Refused()}, {"a": Refused(), (2,): 2}],
)
def test_what_both_refuse_raises_what_json_raises(record: dict[Any, Any]) -> None:
    """A key `json` refuses and a transcoding that raises: `json` meets them in order."""
    reference, store = JSONTranscoder(), StoreTranscoder()
    for transcoder in (reference, store):
        transcoder.register(RefusedAsNothing())
    assert written_with(store, record) == written_with(reference, record)
