"""What changed between two recorded versions of one Clerk object (SPEC 3, "Changes").

Clerk sends the whole new object on every update and never the previous values, so a change list
is the diff of two snapshots. Field paths are dotted; elements of lists of identified objects
(`email_addresses`, `phone_numbers`, ...) are addressed by their id, not by their position, so a
reordering is not a change and a change names the element it concerns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypedDict

# `from` is a keyword, hence the functional form.
Change = TypedDict("Change", {"field": str, "from": Any, "to": Any})

# Keys that change without anyone changing anything (`updated_at`) or that only name the type.
IGNORED_KEYS = frozenset({"updated_at", "object"})


def diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Change]:
    """The fields of `new` that differ from `old`, sorted by path.

    `old=None` is the first version: every non-empty leaf of `new` is an initial value.
    """
    if old is None:
        changes = [_change(path, None, value) for path, value in _leaves(new, "")]
    else:
        changes = list(_diff_mappings(old, new, ""))
    return sorted(changes, key=lambda change: change["field"])


def _change(field: str, old: Any, new: Any) -> Change:
    return {"field": field, "from": old, "to": new}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


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


def _leaves(value: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """Every non-empty leaf of a mapping, recursing into mappings and identified lists."""
    for key, item in value.items():
        if key in IGNORED_KEYS:
            continue
        path = _join(prefix, key)
        if isinstance(item, Mapping):
            yield from _leaves(item, path)
            continue
        elements = _by_id(item)
        if elements:
            for element_id, element in elements.items():
                # The element's id is in its path already.
                rest = {k: v for k, v in element.items() if k != "id"}
                yield from _leaves(rest, _join(path, element_id))
        elif not _is_empty(item):
            yield path, item


def _diff_mappings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> Iterator[Change]:
    for key in old.keys() | new.keys():
        if key in IGNORED_KEYS:
            continue
        old_value, new_value = old.get(key), new.get(key)
        # Most of an update is unchanged: one comparison in C skips a whole equal subtree, which
        # the walk below would find yields nothing (it compares leaves with == too).
        if old_value == new_value:
            continue
        yield from _diff_values(old_value, new_value, _join(prefix, key))


def _diff_values(old: Any, new: Any, path: str) -> Iterator[Change]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        yield from _diff_mappings(old, new, path)
        return
    # A nested object that appears or goes (a domain's `verification`, null until verified):
    # its leaves, as a first version lists them, so a field filter finds them either way.
    if old is None and isinstance(new, Mapping):
        yield from (_change(leaf, None, value) for leaf, value in _leaves(new, path))
        return
    if new is None and isinstance(old, Mapping):
        yield from (_change(leaf, value, None) for leaf, value in _leaves(old, path))
        return
    old_elements, new_elements = _by_id(old), _by_id(new)
    if old_elements is not None and new_elements is not None:
        yield from _diff_elements(old_elements, new_elements, path)
        return
    if old != new:
        yield _change(path, old, new)


def _diff_elements(
    old: dict[str, Mapping[str, Any]], new: dict[str, Mapping[str, Any]], path: str
) -> Iterator[Change]:
    """Identified elements: added or removed as a whole, kept ones compared field by field."""
    for element_id in old.keys() | new.keys():
        element_path = _join(path, element_id)
        if element_id not in new:
            yield _change(element_path, dict(old[element_id]), None)
        elif element_id not in old:
            yield _change(element_path, None, dict(new[element_id]))
        else:
            yield from _diff_mappings(old[element_id], new[element_id], element_path)
