"""`audit.jsontext.loads` reads JSON text exactly as `json.loads` does, only faster."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.jsontext import loads

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
