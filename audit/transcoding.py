"""How the event store's records are written as JSON and read back.

eventsourcing's `JSONTranscoder` reads with `json` and a Python hook on every object. A stored
delivery is mostly its body, kept as one JSON string inside the record, which `json` unescapes
more slowly than orjson: with orjson, reading a record takes 3.9-4.1 us instead of 8.4-9.2 us,
and decoding a delivery as the projections do 11.8-12.4 us instead of 16.8-17.5 us
(bench/decode.py). `StoreTranscoder` writes exactly what `JSONTranscoder` writes and reads the
same values back: orjson reads the record, then the same hook is applied to every object,
innermost first, as `json` would; what orjson might read otherwise than `json` (below) is read
by `json`. Writing, orjson writes a record once each registered type in it (a UUID, a time) has
been replaced by its transcoding's object, as `json` does through its `default`; a record
holding anything else (a float, an integer beyond 64 bits) is written by `json`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder, Transcoding

from audit.aggregates.state import (
    SNAPSHOT_VERSION,
    OrganizationState,
    OutdatedSnapshot,
    UserState,
)
from audit.jsontext import loads

# Deeper than a record's own nesting: a payload's attributes nested deeper are read and
# written by `json`.
MAX_DEPTH = 32
# What `json` writes as its own, subclasses included, before it would look for a transcoding.
_JSON_TYPES = (str, int, float, dict, list, tuple)
# A record's members that hold a payload's own JSON, which never holds a transcoded type: read
# as they are. A signed `event_attributes` holding an object shaped like one (`{"_type_": "x",
# "_data_": 1}`) was stored, then failed every read of its record (its stream's folds answered
# 500, the projections recorded it as an error), or was read back as a datetime.
PLAIN_MEMBERS = frozenset({"event_attributes"})


class _ReadByJson(Exception):
    """orjson's reading may differ from `json`'s here: read the record with `json`."""


class _WriteByJson(Exception):
    """orjson's writing may differ from `json`'s here: write the record with `json`."""


class StoreTranscoder(JSONTranscoder):
    def encode(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(self._as_json_types(obj, 0))
        except (orjson.JSONEncodeError, _WriteByJson):
            return super().encode(obj)

    def _as_json_types(self, value: Any, depth: int) -> Any:
        """`value` with each registered type replaced by its transcoding's object, as `json`'s
        `default` replaces it, recursively.

        Raises _WriteByJson at anything orjson might write otherwise than `json`: a float
        (`json` writes `1e-07` and `NaN` where orjson writes `1e-7` and `null`), a subclass of
        a JSON type, a key that is not a string (checked before its value, as `json` does, so a
        record both would refuse raises what `json` raises), a type with no transcoding (for
        `json` to refuse), deep nesting. orjson itself refuses an integer beyond 64 bits and a
        lone surrogate. A record written by `json` after all has its transcodings run twice.
        """
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            return value
        if depth > MAX_DEPTH:
            raise _WriteByJson()
        if kind is dict:
            copied = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise _WriteByJson()
                copied[key] = self._as_json_types(item, depth + 1)
            return copied
        if kind is list or kind is tuple:
            return [self._as_json_types(item, depth + 1) for item in value]
        transcoding = self.types.get(kind)
        # `json` writes a subclass of its own types as that type, transcoding or not.
        if transcoding is None or isinstance(value, _JSON_TYPES):
            raise _WriteByJson()
        encoded = transcoding.encode(value)
        return {"_type_": transcoding.name, "_data_": self._as_json_types(encoded, depth + 1)}

    def decode(self, data: bytes) -> Any:
        try:
            record = orjson.loads(data)
            if type(record) is dict:
                return self._revive(record, 0, plain=False, by_orjson=True)
        except (orjson.JSONDecodeError, _ReadByJson):
            pass
        record = json.loads(data)  # `json` as `JSONTranscoder` reads, with the hook below
        return self._revive(record, 0, plain=False, by_orjson=False)

    def _revive(self, value: Any, depth: int, *, plain: bool, by_orjson: bool) -> Any:
        """`value` with every object replaced by what the hook makes of it, children before
        their parents, as `json`'s `object_hook` does, except within PLAIN_MEMBERS.

        Read `by_orjson`, raises _ReadByJson at a float, which orjson also makes of an integer
        beyond 64 bits (`json` keeps it an int; a record's own numbers are all integers), and at
        deep nesting, which a payload's attributes may have (at most 256 levels: `json` then).
        """
        if by_orjson and depth > MAX_DEPTH:
            raise _ReadByJson()
        is_dict = type(value) is dict
        items = value.items() if is_dict else enumerate(value)
        for key, item in items:
            kind = type(item)
            if kind is dict or kind is list:
                within = plain or (depth == 0 and key in PLAIN_MEMBERS)
                value[key] = self._revive(item, depth + 1, plain=within, by_orjson=by_orjson)
            elif by_orjson and kind is float:
                raise _ReadByJson()
        return self._decode_obj(value) if is_dict and not plain else value


class StateAsJson(Transcoding):
    """Snapshots hold a UserState or OrganizationState, as one JSON string of its JSON-safe form.

    A string, not nested dicts: the transcoder runs a Python hook on every dict it decodes,
    which made reading a large snapshot as slow as folding the stream it replaces.
    """

    def __init__(self, state_class: type[UserState] | type[OrganizationState], name: str) -> None:
        self.type = state_class
        self.name = name

    def encode(self, obj: UserState | OrganizationState) -> str:
        return json.dumps(obj.to_snapshot(), separators=(",", ":"))

    def decode(self, data: str) -> UserState | OrganizationState:
        snapshot = loads(data)
        if snapshot.get("snapshot_version") != SNAPSHOT_VERSION:
            raise OutdatedSnapshot(snapshot.get("snapshot_version"))
        return self.type.from_snapshot(snapshot)
