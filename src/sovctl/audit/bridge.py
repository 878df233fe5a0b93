"""The blackout's only way out of its namespace: a bridge to each configured [cluster] worker.

A fleet's head needs its RPC workers, and the blackout's namespace has nothing but loopback.
Rather than give the namespace an interface (and with it a route somewhere), the audit
carries exactly the worker connections itself:

    runtime --TCP--> worker's address, on the namespace's lo  (inner relay, in the namespace)
            --Unix socket-->  outer relay (the audit's own process, outside)
            --TCP--> the worker itself

The inner relay listens on each worker's own address and port, added to the namespace's
loopback, so the runtime runs with the `--rpc` list it was configured with. The outer relay
connects to those endpoints and nothing else, and counts what it carries. Any other address
stays unreachable from the namespace, which still has `lo` as its only interface.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sovctl.config import parse_endpoint
from sovctl.errors import ConfigError
from sovctl.net import Resolver, _system_resolver, ip_literal

_CHUNK = 1 << 20
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Bridge:
    endpoint: str  # the worker as configured, HOST:PORT
    address: str  # the IPv4 address it resolved to outside the namespace
    port: int
    socket: str  # the Unix socket the outer relay listens on

    @property
    def literal(self) -> str:
        """The endpoint the runtime is given in the namespace, where no name resolves."""
        return f"{self.address}:{self.port}"


def plan_bridges(workers: Sequence[str], directory: Path,
                 resolve: Resolver = _system_resolver) -> tuple[Bridge, ...]:
    """One bridge per worker, its name resolved here, outside, where resolvers answer.
    llama.cpp splits an endpoint at its first colon, so the address must be IPv4."""
    out = []
    for i, endpoint in enumerate(workers):
        host, port = parse_endpoint(endpoint)
        literal = ip_literal(host)
        if literal is None:
            try:
                found = [a for a in map(ip_literal, resolve(host)) if a is not None]
            except (OSError, UnicodeError):
                found = []
            literal = next((a for a in found if a.version == 4), None)
        if literal is None or literal.version != 4:
            raise ConfigError(f"cannot bridge the blackout to worker {endpoint}: {host} has no "
                              "IPv4 address here",
                              hint="name the worker by an IPv4 address (or a name resolving to "
                              "one) in [cluster] workers")
        out.append(Bridge(endpoint, str(literal), port, str(directory / f"w{i}.sock")))
    return tuple(out)


# -- moving bytes ---------------------------------------------------------------------------------

@dataclass
class Traffic:
    """What the outer relay carried for one worker."""

    connections: int = 0
    to_worker: int = 0
    from_worker: int = 0
    failed: list[str] = field(default_factory=list)  # connects to the worker that failed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, connections: int = 0, to_worker: int = 0, from_worker: int = 0) -> None:
        with self._lock:
            self.connections += connections
            self.to_worker += to_worker
            self.from_worker += from_worker


def _pump(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    try:
        while data := src.recv(_CHUNK):
            dst.sendall(data)
            count(len(data))
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _splice(a: socket.socket, b: socket.socket, a_to_b: Callable[[int], None],
            b_to_a: Callable[[int], None]) -> None:
    back = threading.Thread(target=_pump, args=(b, a, b_to_a), daemon=True)
    back.start()
    _pump(a, b, a_to_b)
    back.join()
    a.close()
    b.close()


def _no_delay(s: socket.socket) -> socket.socket:
    # RPC is a chatty request/answer protocol: Nagle's delay would add to every token.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class _Relay:
    """Accepts on `listener`; joins each connection to a fresh one from `connect`."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket],
                 traffic: Traffic | None = None) -> None:
        self.listener = listener
        self.connect = connect
        self.traffic = traffic or Traffic()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            peer = self.connect()
        except OSError as e:
            self.traffic.failed.append(e.strerror or str(e))
            conn.close()
            return
        t = self.traffic
        t.add(connections=1)
        _splice(conn, peer, lambda n: t.add(to_worker=n), lambda n: t.add(from_worker=n))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class Outer:
    """The audit's side, outside the namespace: a Unix socket per worker, relayed to it."""

    def __init__(self, bridges: Sequence[Bridge]) -> None:
        self.bridges = tuple(bridges)
        self.traffic = {b.endpoint: Traffic() for b in self.bridges}
        self._relays: list[_Relay] = []

    def __enter__(self) -> Outer:
        for b in self.bridges:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(b.socket)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(b.socket)
            os.chmod(b.socket, 0o600)
            listener.listen(16)
            self._relays.append(_Relay(listener, _dialer(b), self.traffic[b.endpoint]))
        return self

    def __exit__(self, *_: object) -> None:
        for r in self._relays:
            r.close()
        for b in self.bridges:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(b.socket)

    def report(self) -> list[dict[str, object]]:
        return [{"endpoint": b.endpoint, "address": b.literal, "via": "the audit's relay",
                 "connections": t.connections, "bytes_to_worker": t.to_worker,
                 "bytes_from_worker": t.from_worker, "failed_connects": list(t.failed)}
                for b, t in ((b, self.traffic[b.endpoint]) for b in self.bridges)]


def _dialer(b: Bridge) -> Callable[[], socket.socket]:
    def dial() -> socket.socket:
        s = socket.create_connection((b.address, b.port), timeout=CONNECT_TIMEOUT)
        s.settimeout(None)
        return _no_delay(s)
    return dial


def _unix_dialer(path: str) -> Callable[[], socket.socket]:
    def dial() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return s
    return dial


def open_inner(bridges: Sequence[Bridge]) -> list[_Relay]:
    """The namespace's side: each worker's address on lo, a listener on its port, relayed to
    the outer side's Unix socket. Runs in the namespace, after it was entered."""
    for address in dict.fromkeys(b.address for b in bridges):
        if not ipaddress.ip_address(address).is_loopback:
            add_address(address)
    relays = []
    for b in bridges:
        listener = socket.create_server((b.address, b.port), backlog=16)
        _no_delay(listener)
        relays.append(_Relay(listener, _unix_dialer(b.socket)))
    return relays


# -- an address on lo, over rtnetlink (what `ip addr add ADDR/32 dev lo` does) -------------------

_RTM_NEWADDR, _NLMSG_ERROR = 20, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def _rtattr(kind: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)


def add_address(address: str, interface: str = "lo") -> None:
    raw = ipaddress.IPv4Address(address).packed
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, socket.if_nametoindex(interface)) \
        + _rtattr(_IFA_LOCAL, raw) + _rtattr(_IFA_ADDRESS, raw)
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_EXCL | _NLM_F_CREATE
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.send(struct.pack("=IHHII", 16 + len(body), _RTM_NEWADDR, flags, 1, 0) + body)
        answer = s.recv(65536)
    kind = struct.unpack_from("=H", answer, 4)[0]
    error = struct.unpack_from("=i", answer, 16)[0] if kind == _NLMSG_ERROR else 0
    if error:
        raise OSError(-error, f"adding {address} to {interface}: {os.strerror(-error)}")
