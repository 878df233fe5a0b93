"""Recording every attempt a process makes to leave the machine.

An audit hook (PEP 578) sees each socket connect and each name lookup before it happens.
The hook only records: blocking is the network namespace's job, and an attempt that could
not succeed is still evidence that a component wanted to phone out.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ENV_LOG = "SOVCTL_EGRESS_LOG"
ENV_PROBE = "SOVCTL_EGRESS_PROBE"  # host:port; one deliberate connect, to prove the recorder works

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local_host(host: str) -> bool:
    if host in _LOCAL_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def _is_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host not in _LOCAL_NAMES
    return False


def install(log_path: Path, component: str) -> None:
    lock = threading.Lock()
    busy = threading.local()

    def record(event: str, target: str) -> None:
        line = json.dumps({"time": time.time(), "pid": os.getpid(), "component": component,
                           "event": event, "target": target}) + "\n"
        with lock, open(log_path, "a") as f:
            f.write(line)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if getattr(busy, "on", False):
            return  # our own file writes raise audit events too
        target = None
        if event == "socket.connect" or event == "socket.sendto":
            address = args[1]
            if (isinstance(address, tuple) and address and isinstance(address[0], str)
                    and not _is_local_host(address[0])):
                target = f"{address[0]}:{address[1] if len(address) > 1 else ''}"
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
            host = args[0]
            if isinstance(host, bytes):
                host = host.decode(errors="replace")
            if isinstance(host, str) and _is_name(host):
                target = host
        if target is not None:
            busy.on = True
            try:
                record(event, target)
            finally:
                busy.on = False

    sys.addaudithook(hook)


def probe(address: str) -> None:
    """Attempt one outbound connection (expected to fail in a blackout)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    except OSError:
        pass


def read_log(log_path: Path) -> list[dict[str, Any]]:
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
