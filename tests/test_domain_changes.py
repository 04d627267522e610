"""diff(): what changed between two versions of a Clerk object."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from audit.aggregates.changes import MAX_FIELD_LENGTH, diff, field_keys, field_path
from tests.domain_factories import email_address, envelope


def user_data() -> dict:
    return envelope("user.created")["data"]


def test_first_version_lists_every_non_empty_leaf() -> None:
    new = {
        "object": "user",
        "id": "user_1",
        "first_name": "Ann",
        "username": None,
        "public_metadata": {"plan": "pro", "empty": {}},
        "private_metadata": {},
        "phone_numbers": [],
        "tags": ["a", "b"],
        "email_addresses": [{"id": "idn_1", "object": "email_address", "email_address": "a@x"}],
        "updated_at": 5,
    }
    assert diff(None, new) == [
        {"field": "email_addresses.idn_1.email_address", "from": None, "to": "a@x"},
        {"field": "first_name", "from": None, "to": "Ann"},
        {"field": "id", "from": None, "to": "user_1"},
        {"field": "public_metadata.plan", "from": None, "to": "pro"},
        {"field": "tags", "from": None, "to": ["a", "b"]},
    ]


def test_identical_versions_have_no_changes() -> None:
    assert diff(user_data(), user_data()) == []


def test_updated_at_and_object_are_ignored_at_every_depth() -> None:
    old = user_data()
    new = copy.deepcopy(old)
    new["updated_at"] += 1000
    new["email_addresses"][0]["updated_at"] += 1000
    new["email_addresses"][0]["object"] = "something_else"
    new["object"] = "other"
    assert diff(old, new) == []


def test_reordering_identified_elements_is_not_a_change() -> None:
    old = user_data()
    old["email_addresses"] = [email_address("idn_a", "a@x.com"), email_address("idn_b", "b@x.com")]
    new = copy.deepcopy(old)
    new["email_addresses"].reverse()
    assert diff(old, new) == []


def test_an_element_field_change_names_the_element_id() -> None:
    old = user_data()
    old["email_addresses"] = [email_address("idn_a", "a@x.com"), email_address("idn_b", "b@x.com")]
    new = copy.deepcopy(old)
    new["email_addresses"].reverse()
    new["email_addresses"][0]["verification"]["status"] = "unverified"
    assert diff(old, new) == [
        {
            "field": "email_addresses.idn_b.verification.status",
            "from": "verified",
            "to": "unverified",
        }
    ]


def test_added_and_removed_elements_are_whole_values() -> None:
    a, b, c = (email_address(f"idn_{x}", f"{x}@x.com") for x in "abc")
    old = {"email_addresses": [a, b]}
    new = {"email_addresses": [b, c]}
    assert diff(old, new) == [
        {"field": "email_addresses.idn_a", "from": a, "to": None},
        {"field": "email_addresses.idn_c", "from": None, "to": c},
    ]


def test_from_empty_list_to_elements_is_an_addition() -> None:
    element = email_address("idn_a", "a@x.com")
    assert diff({"email_addresses": []}, {"email_addresses": [element]}) == [
        {"field": "email_addresses.idn_a", "from": None, "to": element}
    ]


def test_other_lists_compare_as_whole_values() -> None:
    old = {"permissions": ["org:a", "org:b"], "mixed": [{"id": "x"}, 1]}
    new = {"permissions": ["org:b", "org:a"], "mixed": [{"id": "x"}, 2]}
    assert diff(old, new) == [
        {"field": "mixed", "from": [{"id": "x"}, 1], "to": [{"id": "x"}, 2]},
        {"field": "permissions", "from": ["org:a", "org:b"], "to": ["org:b", "org:a"]},
    ]


def test_nested_dicts_recurse_and_missing_keys_read_as_none() -> None:
    old = {"public_metadata": {"plan": "free", "seats": 1}, "gone": 1}
    new = {"public_metadata": {"plan": "pro"}, "verification": {"status": "verified"}}
    assert diff(old, new) == [
        {"field": "gone", "from": 1, "to": None},
        {"field": "public_metadata.plan", "from": "free", "to": "pro"},
        {"field": "public_metadata.seats", "from": 1, "to": None},
        {"field": "verification.status", "from": None, "to": "verified"},
    ]


def test_a_value_replacing_a_dict_is_one_change() -> None:
    assert diff({"verification": {"status": "verified"}}, {"verification": "none"}) == [
        {"field": "verification", "from": {"status": "verified"}, "to": "none"}
    ]


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["a", "b"]))
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        # Keys with dots and backslashes: metadata is the customer's JSON.
        | st.dictionaries(
            st.sampled_from(["a", "b", "a.b", "b\\", "updated_at", "id"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)
json_object = st.dictionaries(st.sampled_from(["x", "y", "z", "object"]), json_value, max_size=4)


@settings(max_examples=100)
@given(json_object, json_object)
@example({}, {"x": {"a.b": 1, "a": {"b": 2}}})
def test_diff_is_sorted_and_empty_only_for_equal_inputs(old: dict, new: dict) -> None:
    changes = diff(old, new)
    fields = [change["field"] for change in changes]
    assert fields == sorted(fields)
    assert len(set(fields)) == len(fields)
    assert diff(new, new) == []
    for change in changes:
        assert change["from"] != change["to"]


def test_a_nested_object_that_appears_or_goes_is_listed_leaf_by_leaf() -> None:
    """As a first version lists it: `field=verification.status` then finds a domain verified
    after its creation (a null `verification` that became an object was one whole change)."""
    verification = {"status": "verified", "strategy": "email_code", "attempts": None}
    assert diff({"verification": None}, {"verification": verification}) == [
        {"field": "verification.status", "from": None, "to": "verified"},
        {"field": "verification.strategy", "from": None, "to": "email_code"},
    ]
    assert diff({"verification": verification}, {}) == [
        {"field": "verification.status", "from": "verified", "to": None},
        {"field": "verification.strategy", "from": "email_code", "to": None},
    ]
    assert diff(None, {"verification": {}}) == []  # a first version lists values, not empties
    assert diff(None, {"verification": verification}) == diff(
        {"verification": None}, {"verification": verification}
    )


@pytest.mark.parametrize(
    ("old", "new", "field", "before", "after"),
    [
        ({"v": None}, {"v": {}}, "v", None, {}),
        ({}, {"v": {}}, "v", None, {}),
        ({"v": {}}, {}, "v", {}, None),
        ({"v": {}}, {"v": {"k": {}}}, "v.k", None, {}),
        ({"v": {"k": {}}}, {"v": {}}, "v.k", {}, None),
        ({"v": None}, {"v": {"object": "x", "k": None}}, "v", None, {"object": "x", "k": None}),
        ({"m_metadata": {"a": None}}, {"m_metadata": {"a": {}}}, "m_metadata.a", None, {}),
    ],
)
def test_an_empty_object_set_or_unset_is_a_change(
    old: dict, new: dict, field: str, before: Any, after: Any
) -> None:
    """`null` -> `{}` differs, and `as_of` shows it: the change was missing (found by review)."""
    assert diff(old, new) == [{"field": field, "from": before, "to": after}]


def test_a_key_with_a_dot_is_not_the_field_of_a_nested_object() -> None:
    """Two fields of one path made a version's change rows collide: the version was unrecordable
    (unsafe_metadata is written by end users)."""
    new = {"unsafe_metadata": {"a.b": 1, "a": {"b": 2}, "c\\": 3}}
    assert diff(None, new) == [
        {"field": "unsafe_metadata.a.b", "from": None, "to": 2},
        {"field": "unsafe_metadata.a\\.b", "from": None, "to": 1},
        {"field": "unsafe_metadata.c\\\\", "from": None, "to": 3},
    ]
    assert [field_keys(change["field"]) for change in diff(None, new)] == [
        ["unsafe_metadata", "a", "b"],
        ["unsafe_metadata", "a.b"],
        ["unsafe_metadata", "c\\"],
    ]


def test_a_key_with_a_nul_is_not_the_key_with_what_postgresql_holds_for_it() -> None:
    """PostgreSQL text holds U+FFFD for a NUL: keys `a\\x00` and `a\\ufffd` of one version
    were one path there, their change rows collided, and the version and every later one of
    that user was set aside as poison (QA). A NUL is written `\\0`."""
    new = {"unsafe_metadata": {"a\x00": 1, "a\ufffd": 2, "a\\0": 3}}
    fields = [change["field"] for change in diff(None, new)]
    assert fields == ["unsafe_metadata.a\\0", "unsafe_metadata.a\\\\0", "unsafe_metadata.a\ufffd"]
    assert not any("\x00" in field for field in fields)
    assert [field_keys(field)[1] for field in fields] == ["a\x00", "a\\0", "a\ufffd"]


@given(st.lists(st.text(alphabet="a0.\\\x00\ufffd", max_size=4), min_size=1, max_size=4))
def test_a_field_path_gives_back_its_keys(keys: list[str]) -> None:
    assert field_keys(field_path(keys)) == keys


def test_a_change_too_deep_to_index_is_listed_whole_at_its_longest_ancestor_that_fits() -> None:
    """A path is at most MAX_FIELD_LENGTH long: the read models index it (on PostgreSQL a longer
    one made the version unrecordable). Its ancestor's whole change holds what changed."""
    long_key = "k" * MAX_FIELD_LENGTH
    old = {"first_name": "Ann", "unsafe_metadata": {"short": 1, "deep": {"x": 1}}}
    new = {
        "first_name": "Bo",
        "unsafe_metadata": {"short": 2, "deep": {"x": 1, long_key: 1, long_key + "2": {"y": 2}}},
        "private_metadata": {"list": [{"id": "e" * MAX_FIELD_LENGTH, "v": 1}]},
    }
    assert diff(old, new) == [
        {"field": "first_name", "from": "Ann", "to": "Bo"},
        {"field": "private_metadata.list", "from": None, "to": new["private_metadata"]["list"]},
        {"field": "unsafe_metadata.deep", "from": {"x": 1}, "to": new["unsafe_metadata"]["deep"]},
        {"field": "unsafe_metadata.short", "from": 1, "to": 2},
    ]
    # A first version, and an ancestor inside another's reach: one change, the outer one.
    first = {"m": {long_key: {long_key: 1}}, "n": 1}
    assert diff(None, first) == [
        {"field": "m", "from": None, "to": first["m"]},
        {"field": "n", "from": None, "to": 1},
    ]
    # Inside an identified list's element, which is found by its id.
    element = {"id": "idn_" + "e" * (MAX_FIELD_LENGTH - 11), "deep": {"z": 1}}
    changed = {**element, "deep": {"z": 2}}
    assert diff({"l": [element]}, {"l": [changed]}) == [
        {"field": f"l.{element['id']}.deep", "from": {"z": 1}, "to": {"z": 2}}
    ]


# Objects whose paths grow past MAX_FIELD_LENGTH within a few levels.
long_path_object = st.dictionaries(
    st.sampled_from(["m", "n"]),
    st.recursive(
        json_leaf,
        lambda inner: st.dictionaries(st.sampled_from(["k" * 100, "j" * 90, "a.b"]), inner),
        max_leaves=6,
    ),
)


@settings(max_examples=100)
@given(long_path_object, long_path_object)
@example({}, {"m": {"k" * 100: {"j" * 90: {"k" * 100: 1, "a.b": 2}}}})
def test_every_field_fits_and_names_one_field(old: dict, new: dict) -> None:
    changes = diff(old, new)
    fields = [change["field"] for change in changes]
    assert all(len(field) <= MAX_FIELD_LENGTH for field in fields)
    assert len(set(fields)) == len(fields)
    # No change lies inside another's.
    keys = [tuple(field_keys(field)) for field in fields]
    assert not [(a, b) for a in keys for b in keys if a != b and b[: len(a)] == a]
    assert all(change["from"] != change["to"] for change in changes)


def test_object_and_updated_at_are_data_in_metadata() -> None:
    """Ignored as Clerk's own bookkeeping, they are the customer's fields under `*_metadata`
    (a device's `object`, a contract's `updated_at`), at any depth there."""
    old = {
        "updated_at": 1,
        "object": "user",
        "public_metadata": {"object": "laptop"},
        "email_addresses": [{"id": "idn_1", "object": "email_address", "updated_at": 4}],
    }
    new = {
        "updated_at": 2,
        "object": "user",
        "public_metadata": {"object": "server", "x": {"updated_at": "2024-06-01"}},
        "email_addresses": [{"id": "idn_1", "object": "email_address", "updated_at": 5}],
    }
    assert diff(old, new) == [
        {"field": "public_metadata.object", "from": "laptop", "to": "server"},
        {"field": "public_metadata.x.updated_at", "from": None, "to": "2024-06-01"},
    ]
    assert diff(None, {"object": "organization", "private_metadata": {"object": 1}}) == [
        {"field": "private_metadata.object", "from": None, "to": 1}
    ]
