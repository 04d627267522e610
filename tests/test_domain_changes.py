"""diff(): what changed between two versions of a Clerk object."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from audit.aggregates.changes import diff
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
        | st.dictionaries(st.sampled_from(["a", "b", "updated_at", "id"]), inner, max_size=3)
    ),
    max_leaves=8,
)
json_object = st.dictionaries(st.sampled_from(["x", "y", "z", "object"]), json_value, max_size=4)


@settings(max_examples=100)
@given(json_object, json_object)
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
    assert diff({"verification": None}, {"verification": {}}) == []
    assert diff(None, {"verification": verification}) == diff(
        {"verification": None}, {"verification": verification}
    )
