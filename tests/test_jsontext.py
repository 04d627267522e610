"""`audit.jsontext.loads`, and the webhook's reading of a body, read JSON text exactly as
`json.loads` does, only faster."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.aggregates.delivery import MAX_NESTING, InvalidPayload, parse_delivery
from audit.jsontext import dumps, dumps_sorted, loads

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**90), max_value=2**90)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(value=json_values, ascii_only=st.booleans())
def test_loads_reads_what_json_reads(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    read = loads(text)
    assert read == json.loads(text)
    assert json.dumps(read) == json.dumps(json.loads(text))  # types too: 2**70 stays an int


@given(value=json_values | st.dictionaries(st.integers(), json_values))
def test_dumps_sorted_writes_what_dumps_writes_sorted(value: object) -> None:
    assert dumps_sorted(value) == dumps(value, sort_keys=True)


@pytest.mark.parametrize(
    "text",
    ['{"a": 1180591620717411303424}', "[-9223372036854775809]", '["\\ud800"]', "[NaN]"],
)
def test_what_orjson_would_misread_or_refuse(text: str) -> None:
    assert json.dumps(loads(text)) == json.dumps(json.loads(text))


def test_fallback_arguments_apply_where_json_reads() -> None:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    with pytest.raises(ValueError, match="NaN"):
        loads('{"x": NaN}', parse_constant=refuse)


def read_body(body: bytes) -> str:
    """The data `parse_delivery` reads from `body`, or the error it raises, as text that tells
    types apart."""
    try:
        delivery = parse_delivery(body, svix_id="msg_1", svix_timestamp=1, received_at=1)
    except InvalidPayload as exc:
        return f"InvalidPayload: {exc}"
    return json.dumps(delivery.data)


def read_body_by_json(body: bytes) -> str:
    """What `parse_delivery` read when `json` read every body."""

    class Refused(ValueError):
        pass

    def refuse(constant: str) -> None:
        raise Refused(f"the body contains {constant}, which is not JSON")

    try:
        envelope = json.loads(body.decode(), parse_constant=refuse)
    except RecursionError:
        return f"InvalidPayload: the body nests deeper than {MAX_NESTING} levels"
    except Refused as exc:
        return f"InvalidPayload: {exc}"
    except ValueError:
        return "InvalidPayload: the body is not valid JSON"
    return json.dumps(envelope["data"])


@given(data=st.dictionaries(st.text(), json_values), ascii_only=st.booleans())
def test_a_body_reads_as_json_reads_it(data: dict[str, object], ascii_only: bool) -> None:
    body = json.dumps({"type": "user.updated", "data": data}, ensure_ascii=ascii_only).encode()
    assert read_body(body) == read_body_by_json(body)


@pytest.mark.parametrize("depth", [MAX_NESTING - 3, MAX_NESTING - 2, MAX_NESTING + 10, 900, 5000])
def test_a_deep_body_reads_as_json_reads_it_to_the_nesting_limit_then_as_text(depth: int) -> None:
    """As `json` reads it up to MAX_NESTING levels (the envelope, `data` and `a` are three of
    them); beyond, each deeper array is its own text, at any depth (orjson's and `json`'s
    limits included). A body is never refused for its depth: a user writes their own
    metadata."""
    body = b'{"type": "user.updated", "data": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    if depth + 2 <= MAX_NESTING:
        assert read_body(body) == read_body_by_json(body)
        return
    kept = MAX_NESTING - 2  # the arrays read as arrays
    value: object = "[" * (depth - kept) + "]" * (depth - kept)
    for _ in range(kept):
        value = [value]
    assert read_body(body) == json.dumps({"a": value})


@pytest.mark.parametrize(
    ("inner", "refusal"),
    [
        (b"{not json}", "the body is not valid JSON"),
        (b"[1}", "the body is not valid JSON"),
        (b"[1,]", "the body is not valid JSON"),
        (b'"\x01"', "the body is not valid JSON"),
        (b"NaN", "the body contains NaN, which is not JSON"),
        (b'"\\ud800"', "the body has a lone UTF-16 surrogate, which is not Unicode text"),
    ],
)
@pytest.mark.parametrize("depth", [5, 300, 600, 5000])
def test_what_lies_deeper_than_the_limit_is_checked_as_json_by_the_same_rules(
    inner: bytes, refusal: str, depth: int
) -> None:
    """Read as text past MAX_NESTING, but refused as a shallow body would be (review)."""
    body = b'{"type": "user.updated", "data": {"a": ' + b"[" * depth + inner + b"]" * depth
    assert read_body(body + b"}}") == f"InvalidPayload: {refusal}"
    assert not read_body(body.replace(inner, b"[1]") + b"}}").startswith("InvalidPayload")


def test_brackets_in_strings_and_escaped_quotes_do_not_count_as_levels() -> None:
    text = '"\\"[{' * 300  # a string's brackets, after an escaped backslash
    body = json.dumps({"type": "user.updated", "data": {"a": text, "b": [[1]]}}).encode()
    assert read_body(body) == read_body_by_json(body)
    unbalanced = b'{"type": "user.updated", "data": {"a": ' + b"[" * 3000 + b"}}"
    assert read_body(unbalanced) == "InvalidPayload: the body is not valid JSON"


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": 1180591620717411303424, "b": -9223372036854775809}',
        b'{"a": "\\ud83d\\ude00", "\\\\ud800": "\\\\ud800"}',  # a pair; escaped backslashes
        b'{"a": 1, "a": 2}',
        b'{"a": 1} trailing',
    ],
)
def test_an_odd_body_reads_as_json_reads_it(data: bytes) -> None:
    body = b'{"type": "user.updated", "data": ' + data + b"}"
    assert read_body(body) == read_body_by_json(body)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a": 1e400}', "has a number too large for a float"),  # `json` reads infinity
        (b'{"a": [-1e400]}', "has a number too large for a float"),
        (
            b'{"a": "x\\ud800"}',
            "has a lone UTF-16 surrogate, which is not Unicode text",
        ),  # `json` reads it, orjson refuses
        (b'{"\\udc00": 1}', "has a lone UTF-16 surrogate, which is not Unicode text"),
        (b'{"id": "' + b"a" * 257 + b'"}', "names an id longer than 256 characters"),
    ],
)
def test_a_body_no_store_could_give_back_is_refused(data: bytes, reason: str) -> None:
    """Infinity has no JSON text, a lone surrogate is not Unicode, and a huge id overflows the
    stores' index entries: each failed only later, when stored or read (500s, or 503s for ever
    on PostgreSQL), so the webhook refuses them as invalid payloads."""
    body = b'{"type": "user.updated", "data": ' + data + b"}"
    assert read_body(body) == f"InvalidPayload: the body {reason}"
