"""Who holds a TCP port: checked before a stack starts, and by every health probe.

A health answer proves only that *something* answers on the port. Before it counts, the probe
checks that the listening socket belongs to the process the supervisor started (or one of its
children): another server that happens to hold the port must never pass for ours.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import psutil

from sovctl.errors import BusyError


@dataclass(frozen=True)
class Holder:
    pid: int | None  # None when the listener's process cannot be seen (another user's)
    name: str

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})" if self.pid else self.name


def listener(port: int) -> Holder | None:
    """The process listening on TCP `port` on any address, if one is."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return Holder(None, "a process of another user")
            try:
                return Holder(c.pid, psutil.Process(c.pid).name())
            except psutil.Error:
                return Holder(c.pid, "a process that just exited")
    return None


def ensure_free(host: str, port: int, what: str) -> None:
    """Raise a BusyError naming the holder when `port` cannot be bound on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers bind: a port in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise BusyError(f"cannot bind {what} to {host}:{port}: {e.strerror}",
                                hint="choose another address with --host") from None
    holder = listener(port)
    raise BusyError(
        f"port {port} for {what} is already in use"
        + (f" by {holder}" if holder else ""),
        hint="stop that process, or choose another port with --port (or [serve] port)",
    )


def owned_by(pid: int, port: int) -> bool:
    """Whether `pid` or one of its descendants listens on `port`."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for p in family:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in conns):
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a process about to bind it (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
