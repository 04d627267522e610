"""The order rules of SPEC 3: keys, placement between neighbours, and ObjectVersions."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.aggregates.changes import Change
from audit.aggregates.versions import (
    ObjectVersions,
    Version,
    is_deletion,
    order_key,
    place,
)
from tests.domain_factories import delivery, envelope, payload_types, sample

DELETED: list[Change] = [{"field": "deleted", "from": None, "to": True}]


def version(event_id: str, updated_at: int, *, deletion: bool = False, **data: object) -> Version:
    first = math.inf if deletion else updated_at
    return Version(
        event_id=event_id,
        type="user.deleted" if deletion else "user.updated",
        key=(first, updated_at, 0),
        data={"id": "user_1", **data} if not deletion else {"id": "user_1", "deleted": True},
        deletion=deletion,
        occurred_at=updated_at,
    )


@pytest.mark.parametrize("event_type", payload_types())
def test_only_deletions_are_deletions(event_type: str) -> None:
    expected = event_type.endswith(".deleted")
    assert is_deletion(sample(event_type)) is expected


def test_a_deleted_flag_makes_a_deletion_whatever_the_type() -> None:
    assert is_deletion(sample("user.updated", deleted=True))
    assert not is_deletion(sample("organizationInvitation.revoked"))
    assert not is_deletion(sample("session.revoked"))


def test_order_key_prefers_the_objects_updated_at() -> None:
    updated = sample("user.updated")
    assert order_key(updated, 7, deletion=False) == (1716883500000, 1716883500018, 7)


def test_order_key_falls_back_to_occurred_at_then_zero() -> None:
    email = sample("email.created")  # no updated_at
    assert order_key(email, 1, deletion=False) == (1716883200018, 1716883200018, 1)
    body = envelope("email.created")
    del body["timestamp"]
    undated = delivery(body, svix_id="msg_x", received_at=5)
    assert order_key(undated, 2, deletion=False) == (0, 0, 2)


def test_a_deletion_sorts_last() -> None:
    deleted = sample("user.deleted")
    key = order_key(deleted, 3, deletion=True)
    assert key == (math.inf, 1717056000018, 3)
    assert key > order_key(sample("user.updated"), 99, deletion=False)


def test_place_first_version_lists_initial_values() -> None:
    placement = place(version("a", 1, first_name="Ann"), None, None)
    assert not placement.stale
    assert placement.becomes_current
    assert placement.successor_changes is None
    assert placement.changes == [
        {"field": "first_name", "from": None, "to": "Ann"},
        {"field": "id", "from": None, "to": "user_1"},
    ]


def test_place_between_neighbours_recomputes_the_successor() -> None:
    first = version("a", 1, first_name="Ann")
    last = version("c", 3, first_name="Cat")
    placement = place(version("b", 2, first_name="Bea"), first, last)
    assert placement.stale
    assert not placement.becomes_current
    assert placement.successor_id == "c"
    assert placement.changes == [{"field": "first_name", "from": "Ann", "to": "Bea"}]
    assert placement.successor_changes == [{"field": "first_name", "from": "Bea", "to": "Cat"}]


def test_place_deletion_and_second_deletion() -> None:
    live = version("a", 1, first_name="Ann")
    deletion = version("d1", 5, deletion=True)
    placement = place(deletion, live, None)
    assert placement.changes == DELETED
    assert not placement.stale
    assert placement.becomes_current
    second = place(version("d2", 6, deletion=True), deletion, None)
    assert second.stale
    assert second.changes == []
    assert second.becomes_current


def test_a_late_update_before_a_deletion_is_stale_and_keeps_the_deletion_final() -> None:
    versions = ObjectVersions()
    versions.add(version("a", 1, first_name="Ann"))
    versions.add(version("d", 9, deletion=True))
    placement = versions.add(version("b", 2, first_name="Bea"))
    assert placement.stale
    assert placement.successor_id == "d"
    assert placement.successor_changes is None  # the deletion's change stands
    assert versions.deleted
    assert versions.current is not None and versions.current.event_id == "d"
    assert versions.as_data() == {"id": "user_1", "first_name": "Bea", "deleted": True}


def test_as_data_of_an_object_only_known_as_deleted_is_the_stub() -> None:
    versions = ObjectVersions()
    assert versions.as_data() is None
    assert versions.current is None
    versions.add(version("d", 9, deletion=True))
    assert versions.as_data() == {"id": "user_1", "deleted": True}


def test_snapshot_survives_json_including_infinity() -> None:
    versions = ObjectVersions()
    versions.add(version("a", 1, first_name="Ann"))
    versions.add(version("d", 9, deletion=True))
    restored = ObjectVersions.from_snapshot(json.loads(json.dumps(versions.to_snapshot())))
    assert [v.key for v in restored.versions] == [(1, 1, 0), (math.inf, 9, 0)]
    assert restored.as_data() == versions.as_data()
    assert restored.deleted
    placement = restored.add(version("b", 2, first_name="Bea"))
    assert placement.changes == [{"field": "first_name", "from": "Ann", "to": "Bea"}]


def test_json_dumps_of_a_snapshot_is_strict_json() -> None:
    versions = ObjectVersions()
    versions.add(version("d", 9, deletion=True))
    json.dumps(versions.to_snapshot(), allow_nan=False)


# A set of versions of one object: (updated_at, first_name) pairs, some deletions.
version_specs = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["Ann", "Bea", "Cat"]), st.booleans()),
    min_size=1,
    max_size=8,
)


def _build(specs: list[tuple[int, str, bool]]) -> list[Version]:
    built = []
    for index, (updated_at, name, deleting) in enumerate(specs):
        occurred_at = 1000 + index  # distinct, so keys never depend on arrival
        built.append(
            Version(
                event_id=f"v{index}",
                type="user.deleted" if deleting else "user.updated",
                key=(math.inf if deleting else updated_at, occurred_at, 0),
                data={"deleted": True} if deleting else {"first_name": name, "n": updated_at},
                deletion=deleting,
                occurred_at=occurred_at,
            )
        )
    return built


def _record(order: list[Version]) -> tuple[dict[str, list[Change]], ObjectVersions, set[str]]:
    versions = ObjectVersions()
    changes: dict[str, list[Change]] = {}
    stale: set[str] = set()
    for item in order:
        placement = versions.add(item)
        changes[item.event_id] = placement.changes
        if placement.stale:
            stale.add(item.event_id)
        if placement.successor_changes is not None:  # else the successor's changes stand
            changes[placement.successor_id or ""] = placement.successor_changes
    return changes, versions, stale


@settings(max_examples=100)
@given(version_specs, st.randoms(use_true_random=False))
def test_changes_and_state_depend_only_on_the_set_of_versions(specs, rnd) -> None:
    built = _build(specs)
    in_key_order = sorted(built, key=lambda v: v.key)
    shuffled = list(built)
    rnd.shuffle(shuffled)
    expected_changes, expected, expected_stale = _record(in_key_order)
    changes, got, stale = _record(shuffled)
    assert changes == expected_changes
    assert got.as_data() == expected.as_data()
    assert got.deleted == expected.deleted
    assert [v.event_id for v in got.versions] == [v.event_id for v in expected.versions]
    # In key order only a second deletion is stale.
    deletions = [v.event_id for v in in_key_order if v.deletion]
    assert expected_stale == set(deletions[1:])
    # In any order: stale iff a newer version was already recorded, or a deletion already was.
    for index, item in enumerate(shuffled):
        before = shuffled[:index]
        newer = any(other.key > item.key for other in before)
        deleted_again = item.deletion and any(other.deletion for other in before)
        assert (item.event_id in stale) == (newer or deleted_again)
