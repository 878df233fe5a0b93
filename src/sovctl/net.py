"""Whether an address stays on this machine: the one rule every bind and audit decision uses."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

# getaddrinfo's shape, narrowed to what is read here: the address string of each result.
Resolver = Callable[[str], Iterable[str]]


def _system_resolver(host: str) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address when it is written as one ("[::1]" and "fe80::1%eth0" too)."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def stays_local(host: str) -> bool:
    """An IP literal whose traffic never leaves the machine: loopback or unspecified, an
    IPv4-mapped IPv6 address judged by the IPv4 address inside it. A name is not judged here:
    the egress recorders must not resolve names (a lookup is itself an attempt)."""
    addr = ip_literal(host)
    if addr is None:
        return False
    plain = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return (plain or addr).is_loopback or (plain or addr).is_unspecified


def is_loopback(host: str, resolve: Resolver = _system_resolver) -> bool:
    """True only when every address `host` can mean is a loopback address.

    A name is resolved first: `127.example.org` is whatever DNS says it is, and `localhost`
    could be mapped elsewhere in /etc/hosts. A name that does not resolve, and the empty or
    unspecified address (every interface), are not loopback.
    """
    literal = ip_literal(host)
    if literal is not None:
        return literal.is_loopback
    if not host:
        return False
    try:
        addresses = list(resolve(host))
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(
        (a := ip_literal(addr)) is not None and a.is_loopback for addr in addresses)
