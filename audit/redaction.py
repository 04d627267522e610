"""Secrets out (SPEC 3), in one place: what no API response or export may contain.

- `otp_code`, wherever it appears (Clerk puts it in `email.data.data.otp_code`), and every other
  occurrence of that code inside the same item (the sample e-mail's `subject` repeats it), a
  code of digits where no other digit touches it (not inside a phone number);
- likewise `magic_link` and `action_url`, which Clerk's e-mail templates carry in the same place:
  a sign-in link, or an invitation's or verification's link with its ticket, as good as a code;
- likewise an OAuth verification's `external_verification_redirect_url` (in a user's external
  accounts while one is being connected): its `state` lets whoever opens it finish connecting
  their own provider account to that user;
- an e-mail's `body` and `body_plain`;
- an SMS's `message`;
- an invitation's `url`, of an organization or of the application (it carries the invitation
  token).

Secrets are recognised by key and by the kind of object holding them (`data.object`, and the event
type at the top level), so an unrelated `url` or `message` elsewhere is left alone. The event
store keeps what was signed; only what leaves through the API is redacted. A recorded change is
redacted in two steps: by the snapshots it was taken between, when the read model records it
(`redact_recorded_changes`: the kinds their own `object` members name), and by its path and
type when it is read (`redact_change`).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Mapping
from typing import Any

from audit.aggregates.changes import Change, field_keys

REDACTED = "[redacted]"

# Keys that are secret in any object, at any depth.
SECRET_ANYWHERE = frozenset(
    {"otp_code", "magic_link", "action_url", "external_verification_redirect_url"}
)

# Keys that are secret at the top level of one kind of object (by its `object` value).
SECRET_BY_OBJECT: dict[str, frozenset[str]] = {
    "email": frozenset({"body", "body_plain"}),
    "sms_message": frozenset({"message"}),
    "organization_invitation": frozenset({"url"}),
    "invitation": frozenset({"url"}),
}

# Those keys, of any kind: a change to a path holding one may need its snapshots to tell.
# Looked for as lines in a version's paths, each key a line of its own (testing each change's
# path, or a regular expression, took a third as long as the diff itself).
_KEYS_BY_OBJECT = frozenset().union(*SECRET_BY_OBJECT.values())
_KEY_LINES = tuple(f"\n{key}\n" for key in sorted(_KEYS_BY_OBJECT))
_FIELD = operator.itemgetter("field")

# How event types and history object types name those kinds.
_KIND_ALIASES = {
    "email": "email",
    "sms": "sms_message",
    "sms_message": "sms_message",
    "organizationInvitation": "organization_invitation",
    "organization_invitation": "organization_invitation",
    "invitation": "invitation",
}

# A code shorter than this is not scrubbed out of other strings (it would mangle unrelated text).
MIN_SCRUBBED_CODE = 4


def kind_of(type_or_object: str | None) -> str | None:
    """The object kind an event type (`email.created`) or object type (`sms`) names."""
    if not type_or_object:
        return None
    return _KIND_ALIASES.get(type_or_object.split(".", 1)[0])


def redact(value: Any, kind: str | None = None) -> Any:
    """A deep copy of `value` with every secret replaced by "[redacted]".

    `kind` (an event type or object type) says what the top-level object is when it does not
    carry an `object` member itself.
    """
    codes: set[str] = set()
    copied = _redact(value, kind_of(kind), codes)
    codes = {code for code in codes if len(code) >= MIN_SCRUBBED_CODE}
    return _scrub(copied, _code_pattern(codes)) if codes else copied


def redact_change(object_type: str | None, field: str, value: Any) -> Any:
    """A `from`/`to` value of a change to `field` (a dotted path) of an object of `object_type`.

    Under a secret key (`private_metadata.otp_code.x`) the value is part of the secret, whatever
    it is; at one (`otp_code`) it is hidden unless there is none. Elsewhere only what the value
    holds can be secret.
    """
    under = _under_secret(object_type, field)
    if under is None:
        return redact(value) if isinstance(value, dict | list) else value
    return _hidden(value, under)


def redact_recorded_changes(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, changes: list[Change]
) -> list[Change]:
    """`changes` from snapshot `old` to `new` of an object, with what only the snapshots' own
    `object` members make secret hidden: an e-mail's `body` in a payload whose `object` says
    "email" though its type does not, or nested in metadata. What the object's type makes
    secret is `redact_change`'s to hide, which has only a change's path and that type."""
    keys_as_lines = "\n" + "\n".join(map(_FIELD, changes)).replace(".", "\n") + "\n"
    if not any(line in keys_as_lines for line in _KEY_LINES):  # nearly every version
        return changes
    hidden: list[Change] | None = None
    # Identified lists by id, each indexed once: a list of a thousand links in metadata has a
    # thousand changes whose paths hold `url`.
    elements: dict[int, dict[Any, Any]] = {}
    for index, change in enumerate(changes):
        field = change["field"]
        keys = field_keys(field)
        if _KEYS_BY_OBJECT.isdisjoint(keys):
            continue
        # Each side by its own snapshot: an object that is no longer an e-mail shows its body.
        sides = {
            side: _depth_secret_by_object(snapshot, keys, elements)
            for side, snapshot in (("from", old), ("to", new))
        }
        if sides == {"from": None, "to": None}:
            continue
        hidden = list(changes) if hidden is None else hidden
        hidden[index] = {"field": field, "from": change["from"], "to": change["to"]}
        for side, depth in sides.items():
            if depth is not None:
                hidden[index][side] = _hidden(change[side], depth < len(keys) - 1)
    return changes if hidden is None else hidden


def _depth_secret_by_object(
    snapshot: Mapping[str, Any] | None, keys: list[str], elements: dict[int, dict[Any, Any]]
) -> int | None:
    """The depth along `keys` of the first key that the object holding it in `snapshot` keeps
    secret by its own kind, or None. Elements of identified lists are found by their id, as
    change paths name them (`elements`: the lists indexed so far)."""
    holder: Any = snapshot
    depth = 0
    while depth < len(keys) and isinstance(holder, Mapping):
        key = keys[depth]
        if key in _secret_keys_of(_own_kind(holder)):
            return depth
        holder = holder.get(key)
        if isinstance(holder, list) and depth + 1 < len(keys):
            by_id = elements.get(id(holder))
            if by_id is None:
                by_id = elements[id(holder)] = {}
                for element in holder:
                    if isinstance(element, Mapping) and isinstance(element.get("id"), str):
                        by_id.setdefault(element["id"], element)
            holder = by_id.get(keys[depth + 1])
            depth += 1
        depth += 1
    return None


def _hidden(value: Any, under: bool) -> Any:
    """A value at a secret key (`under` it: part of the secret, whatever it is), hidden unless
    there is none."""
    return REDACTED if under or value is not None else value


@functools.lru_cache(maxsize=4096)  # a page asks about the same few fields over and over
def _under_secret(object_type: str | None, field: str) -> bool | None:
    """Whether `field` is under a secret key (True), at one (False), or clear of them (None)."""
    kind = kind_of(object_type)
    keys = field_keys(field)
    for depth, key in enumerate(keys):
        if key in SECRET_ANYWHERE or (depth == 0 and key in SECRET_BY_OBJECT.get(kind or "", ())):
            return depth < len(keys) - 1
    return None


def _redact(value: Any, kind: str | None, codes: set[str]) -> Any:
    if isinstance(value, dict):
        own_kind = _own_kind(value)
        # Both the object's own kind and the event type's: a payload whose `object` names
        # another kind than its type (an `sms.created` saying "email") keeps neither's secrets.
        secret = _secret_keys_of(own_kind)
        if kind is not None:  # the top level only: no set made for every nested object
            secret |= _secret_keys_of(kind)
        result: dict[Any, Any] = {}
        for key, item in value.items():
            if key in SECRET_ANYWHERE:
                _collect_codes(item, codes)
            if item is not None and (key in SECRET_ANYWHERE or key in secret):
                result[key] = REDACTED
            else:
                result[key] = _redact(item, None, codes)
        return result
    if isinstance(value, list):
        return [_redact(item, None, codes) for item in value]
    return value


def _own_kind(value: Mapping[str, Any]) -> str | None:
    """The kind an object's own `object` member names."""
    own = value.get("object")
    return _KIND_ALIASES.get(own, own) if isinstance(own, str) else None


def _secret_keys_of(kind: str | None) -> frozenset[str]:
    return SECRET_BY_OBJECT.get(kind or "", frozenset())


def _collect_codes(value: Any, codes: set[str]) -> None:
    if isinstance(value, str | int) and not isinstance(value, bool):
        codes.add(str(value))


def _code_pattern(codes: set[str]) -> re.Pattern[str]:
    """Each code wherever it stands as itself. A code of digits (a one-time code) is not one
    inside a longer run of digits: the SMS's own `+12345678901` held the code `123456`, and
    showed as `+[redacted]78901`. Longer codes first, where one holds another."""
    return re.compile(
        "|".join(
            rf"(?<![0-9]){re.escape(code)}(?![0-9])"
            if code.isascii() and code.isdigit()
            else re.escape(code)
            for code in sorted(codes, key=len, reverse=True)
        )
    )


def _scrub(value: Any, codes: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return codes.sub(REDACTED, value)
    if isinstance(value, dict):
        return {key: _scrub(item, codes) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item, codes) for item in value]
    return value
