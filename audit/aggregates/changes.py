"""What changed between two recorded versions of one Clerk object (SPEC 3, "Changes").

Clerk sends the whole new object on every update and never the previous values, so a change list
is the diff of two snapshots. Field paths are dotted; elements of lists of identified objects
(`email_addresses`, `phone_numbers`, ...) are addressed by their id, not by their position, so a
reordering is not a change and a change names the element it concerns.

A path names one field and no two fields share one: a key's own dots and backslashes are escaped
(metadata key `a.b` is `unsafe_metadata.a\\.b`, not the `b` of `unsafe_metadata.a`), a NUL is
written `\\0` (PostgreSQL text holds none: U+FFFD in its place, which another key may hold), and
a path is at most MAX_FIELD_LENGTH characters: a change deeper than that is listed whole at its
longest ancestor that fits. (Metadata is the customer's JSON, and `unsafe_metadata` is written by
end users: two fields of one path, or one too long to index, made a version's changes
unrecordable.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from operator import itemgetter
from typing import Any, TypedDict

# `from` is a keyword, hence the functional form.
Change = TypedDict("Change", {"field": str, "from": Any, "to": Any})

# Keys of Clerk's objects that change without anyone changing anything (`updated_at`) or that
# only name the type. Under a `*_metadata` key is the customer's JSON, where they are data.
IGNORED_KEYS = frozenset({"updated_at", "object"})
_NONE_IGNORED: frozenset[str] = frozenset()

_FIELD = itemgetter("field")

# The read models index change paths (B-tree entries are limited to about 2.7 KB on PostgreSQL).
MAX_FIELD_LENGTH = 256


def diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Change]:
    """The fields of `new` that differ from `old`, sorted by path.

    `old=None` is the first version: every non-empty leaf of `new` is an initial value.
    """
    if old is None:
        changes = [_change(path, None, value) for path, value in _leaves(new, "")]
    else:
        changes = list(_diff_mappings(old, new, ""))
    if max(map(len, map(_FIELD, changes)), default=0) > MAX_FIELD_LENGTH:
        changes = _within_length(changes, old, new)
    return sorted(changes, key=_FIELD)


def field_keys(field: str) -> list[str]:
    """The keys (and element ids) along a dotted path, unescaped."""
    if "\\" not in field:
        return field.split(".")
    keys, key, escaped = [], [], False
    for char in field:
        if escaped:
            key.append("\x00" if char == "0" else char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ".":
            keys.append("".join(key))
            key = []
        else:
            key.append(char)
    keys.append("".join(key))
    return keys


def field_path(keys: list[str]) -> str:
    """The dotted path of these keys, each escaped."""
    return ".".join(_escaped(key) for key in keys)


def with_enclosing(field: str) -> list[str]:
    """`field` and every path enclosing it, outermost first: where a change to it may be listed
    (an element or object added or removed whole is one change at its own path)."""
    keys = field_keys(field)
    return [field_path(keys[:depth]) for depth in range(1, len(keys))] + [field]


def _change(field: str, old: Any, new: Any) -> Change:
    return {"field": field, "from": old, "to": new}


def _escaped(key: str) -> str:
    if "." in key or "\\" in key or "\x00" in key:
        return key.replace("\\", "\\\\").replace(".", "\\.").replace("\x00", "\\0")
    return key


def _join(prefix: str, key: str) -> str:
    # Not `_escaped`: a call per field costs a first version 5%.
    if "." in key or "\\" in key or "\x00" in key:
        key = _escaped(key)
    return f"{prefix}.{key}" if prefix else key


def _within_length(
    changes: list[Change], old: Mapping[str, Any] | None, new: Mapping[str, Any]
) -> list[Change]:
    """`changes` with each one whose path is too long replaced by the whole change of its
    longest ancestor that fits (one per ancestor, and none inside another)."""
    ancestors: set[tuple[str, ...]] = set()
    for change in changes:
        if len(change["field"]) > MAX_FIELD_LENGTH:
            keys = field_keys(change["field"])
            # A top-level key is at most MAX_FIELD_LENGTH long (the webhook refuses longer).
            while len(keys) > 1 and len(field_path(keys)) > MAX_FIELD_LENGTH:
                keys.pop()
            ancestors.add(tuple(keys))

    def inside(keys: tuple[str, ...]) -> bool:
        return any(keys[: len(ancestor)] == ancestor for ancestor in ancestors)

    outermost = [ancestor for ancestor in ancestors if not inside(ancestor[:-1])]
    kept = [change for change in changes if not inside(tuple(field_keys(change["field"])))]
    for keys in outermost:
        kept.append(_change(field_path(list(keys)), _at(old, keys), _at(new, keys)))
    return kept


def _at(value: Any, keys: tuple[str, ...]) -> Any:
    """What a path leads to in a snapshot (elements of identified lists by id), or None."""
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key)
        else:
            elements = _by_id(value)
            value = elements.get(key) if elements else None
        if value is None:
            return None
    return value


def _is_empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def _by_id(value: Any) -> dict[str, Mapping[str, Any]] | None:
    """A list of objects that all carry a distinct string id, keyed by id; else None."""
    if not isinstance(value, list):
        return None
    elements: dict[str, Mapping[str, Any]] = {}
    for element in value:
        if not isinstance(element, Mapping):
            return None
        element_id = element.get("id")
        if not isinstance(element_id, str) or element_id in elements:
            return None
        elements[element_id] = element
    return elements


def _ignored_under(key: str, ignored: frozenset[str]) -> frozenset[str]:
    return _NONE_IGNORED if key.endswith("_metadata") else ignored


def _leaves(
    value: Mapping[str, Any], prefix: str, ignored: frozenset[str] = IGNORED_KEYS
) -> Iterator[tuple[str, Any]]:
    """Every non-empty leaf of a mapping, recursing into mappings and identified lists."""
    for key, item in value.items():
        if key in ignored:
            continue
        path = _join(prefix, key)
        if isinstance(item, Mapping):
            yield from _leaves(item, path, _ignored_under(key, ignored))
            continue
        elements = _by_id(item)
        if elements:
            for element_id, element in elements.items():
                # The element's id is in its path already.
                rest = {k: v for k, v in element.items() if k != "id"}
                yield from _leaves(rest, _join(path, element_id), ignored)
        elif not _is_empty(item):
            yield path, item


def _diff_mappings(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    prefix: str,
    ignored: frozenset[str] = IGNORED_KEYS,
) -> Iterator[Change]:
    for key in old.keys() | new.keys():
        if key in ignored:
            continue
        old_value, new_value = old.get(key), new.get(key)
        # Most of an update is unchanged: one comparison in C skips a whole equal subtree, which
        # the walk below would find yields nothing (it compares leaves with == too).
        if old_value == new_value:
            continue
        path = _join(prefix, key)
        yield from _diff_values(old_value, new_value, path, _ignored_under(key, ignored))


def _diff_values(old: Any, new: Any, path: str, ignored: frozenset[str]) -> Iterator[Change]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        yield from _diff_mappings(old, new, path, ignored)
        return
    # A nested object that appears or goes (a domain's `verification`, null until verified):
    # its leaves, as a first version lists them, so a field filter finds them either way. One
    # with none (`{}`, set where there was nothing) is a change still, listed whole.
    if old is None and isinstance(new, Mapping):
        leaves = [_change(leaf, None, value) for leaf, value in _leaves(new, path, ignored)]
        yield from leaves or [_change(path, None, new)]
        return
    if new is None and isinstance(old, Mapping):
        leaves = [_change(leaf, value, None) for leaf, value in _leaves(old, path, ignored)]
        yield from leaves or [_change(path, old, None)]
        return
    old_elements, new_elements = _by_id(old), _by_id(new)
    if old_elements is not None and new_elements is not None:
        yield from _diff_elements(old_elements, new_elements, path, ignored)
        return
    if old != new:
        yield _change(path, old, new)


def _diff_elements(
    old: dict[str, Mapping[str, Any]],
    new: dict[str, Mapping[str, Any]],
    path: str,
    ignored: frozenset[str],
) -> Iterator[Change]:
    """Identified elements: added or removed as a whole, kept ones compared field by field."""
    for element_id in old.keys() | new.keys():
        element_path = _join(path, element_id)
        if element_id not in new:
            yield _change(element_path, dict(old[element_id]), None)
        elif element_id not in old:
            yield _change(element_path, None, dict(new[element_id]))
        else:
            yield from _diff_mappings(old[element_id], new[element_id], element_path, ignored)
