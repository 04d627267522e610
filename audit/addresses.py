"""Client IP addresses as the read models index them, and the `actor_ip=` filter over them.

An actor's IP is kept as Clerk wrote it (`actor.ip`). Beside it, the change history keeps a
key: an address as the 32 hex digits of its IPv6 form, an IPv4 address mapped into IPv6 as
`::ffff:a.b.c.d`. Every notation of one address is then one key, and the addresses of a network
(`10.0.0.0/8`, `2001:db8::/32`) are one range of keys, in byte order. A text that is not an
address (`203.0.113.9, 10.0.0.1`, as a proxy may write it) is keyed as itself after `~`, which
sorts after every address's key, so no network's range holds it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

_IPV4_MAPPED = 0xFFFF << 32
_NOT_AN_ADDRESS = "~"


def _key(number: int) -> str:
    return f"{number:032x}"


def _number(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    if isinstance(address, ipaddress.IPv4Address):
        return _IPV4_MAPPED | int(address)
    return int(address)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address, without an IPv6 zone (`fe80::1%eth0`): a zone names an interface of the
    host that wrote it, not a part of the address. ValueError: not an address."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return ipaddress.IPv6Address(int(address))
    return address


def address_key(text: str | None) -> str | None:
    """The key of a client IP as stored (None for none)."""
    if text is None:
        return None
    typed = text.strip()
    try:
        return _key(_number(_address(typed)))
    except ValueError:
        return _NOT_AN_ADDRESS + typed


@dataclass(frozen=True)
class AddressFilter:
    """What `actor_ip=` asks for: the keys from `low` to `high`, both included (one key, for an
    address or a text that is none). `texts`: the stored texts an address may have been written
    as, for read models kept before the keys (`is_network`: a range, which those cannot answer)."""

    low: str
    high: str
    texts: tuple[str, ...]
    is_network: bool

    @classmethod
    def parse(cls, raw: str) -> AddressFilter:
        """An address in any notation, a network in CIDR notation (host bits may be set:
        `10.1.2.3/8` is `10.0.0.0/8`), or any other text, matched as stored. ValueError: empty,
        or a `/` that is no network."""
        typed = raw.strip()
        if not typed:
            raise ValueError("is empty")
        if "/" in typed:
            try:
                network = ipaddress.ip_network(typed, strict=False)
            except ValueError:
                raise ValueError(
                    "is neither an address nor a network in CIDR notation (10.0.0.0/8)"
                ) from None
            if network.num_addresses > 1:
                first = _number(network.network_address)
                last = first | int(network.hostmask)
                return cls(_key(first), _key(last), (), is_network=True)
            raw = typed = str(network.network_address)  # `/32`, `/128`: one address
        key = address_key(typed)
        assert key is not None
        return cls(key, key, _texts(raw, typed), is_network=False)


def _texts(raw: str, typed: str) -> tuple[str, ...]:
    """An address's usual notations (`2001:DB8:0::1`, `2001:db8::1`; IPv4 and the same mapped
    into IPv6), or the text as typed and trimmed."""
    try:
        address = _address(typed)
    except ValueError:
        return tuple(dict.fromkeys((raw, typed)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    forms = [raw, typed, address.compressed, address.exploded]
    if isinstance(address, ipaddress.IPv4Address):
        forms += [f"::ffff:{address}", f"::FFFF:{address}"]
    else:
        forms += [address.compressed.upper(), address.exploded.upper()]
    return tuple(dict.fromkeys(forms))
