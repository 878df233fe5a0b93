"""Recording every attempt a process makes to leave the machine.

Two recorders, both of which only record: blocking is the network namespace's job, and an
attempt that could not succeed is still evidence that a component wanted to phone out.

- An audit hook (PEP 578), installed in every supervised Python process, sees each socket
  connect and each name lookup Python makes before it happens. It sees nothing that native
  code does: not llama-server, not a C extension opening its own sockets.
- A system call tracer (strace), which the blackout audit starts every process under, sees
  every connect/sendto/sendmsg/sendmmsg of every thread and child, whatever language made it.
  `parse_trace` turns its log into the same records as the hook's.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sovctl.net import ip_literal, stays_local

ENV_LOG = "SOVCTL_EGRESS_LOG"
ENV_PROBE = "SOVCTL_EGRESS_PROBE"  # host:port; one deliberate connect, to prove the recorder works
# LOG: the process runs under strace, which appends what it sees to LOG (only the audit sets it).
ENV_TRACE = "SOVCTL_SYSCALL_TRACE"

HOOK = "audit hook"
STRACE = "strace"
# Every way a process can address a datagram or open a connection with a system call.
TRACED_SYSCALLS = ("connect", "sendto", "sendmsg", "sendmmsg")
# Local daemons that resolve names for a client, from the host's network namespace: a lookup
# handed to one of them leaves the blackout although the client never opens an IP socket.
# (glibc asks nscd first for every hosts *and* passwd lookup: only a connect nscd accepts counts,
# as the hosts lookups it cannot take go on to a DNS socket, which is recorded.)
RESOLVED_SOCKET = "/run/systemd/resolve/io.systemd.Resolve"
NSCD_SOCKETS = ("/var/run/nscd/socket", "/run/nscd/socket")
DNS_PORT = 53

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local_host(host: str) -> bool:
    return host in _LOCAL_NAMES or stays_local(host)


def _is_name(host: str) -> bool:
    return ip_literal(host) is None and host not in _LOCAL_NAMES


def install(log_path: Path, component: str) -> None:
    lock = threading.Lock()
    busy = threading.local()

    def record(event: str, target: str) -> None:
        line = json.dumps({"time": time.time(), "pid": os.getpid(), "component": component,
                           "event": event, "target": target, "recorder": HOOK}) + "\n"
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


def native_probe(address: str) -> None:
    """Attempt one outbound connection from native code (expected to fail in a blackout).

    bash's /dev/tcp redirection calls connect(2) itself: no Python runs in that process, so
    only a recorder outside the process (the tracer) can see the attempt."""
    import subprocess

    host, _, port = address.rpartition(":")
    try:
        subprocess.run(["bash", "-c", 'exec 3<>"/dev/tcp/$1/$2"', "egress-probe", host, port],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        # The probe exists to be seen; its absence must show in the runtime's log.
        sys.stderr.write(f"egress probe from native code not made: {e}\n")


def strace_argv(strace: str, log: str, command: Sequence[str],
                env: Iterable[str] = ()) -> list[str]:
    """`command` under strace, recording its egress system calls into `log`.

    -f follows every thread and child; --seccomp-bpf stops the tracee only at the traced
    calls, so a runtime's other system calls run at full speed; -s 0 keeps the data out of
    the log (prompts and answers are sent with these same calls); -A appends, so a restarted
    process adds to its log; -ttt timestamps each call; -qq and signal=none leave only calls.
    `env` are strace -E operations on the command's environment (VAR=VALUE sets, VAR unsets).
    """
    args = [strace, "-f", "--seccomp-bpf", "-qq", "-ttt", "-s", "0",
            "-e", "trace=" + ",".join(TRACED_SYSCALLS), "-e", "signal=none", "-A", "-o", log]
    for e in env:
        args += ["-E", e]
    return [*args, "--", *command]


_CALL = re.compile(r"^(?P<pid>\d+) +(?P<time>\d+\.\d+) +(?:(?P<call>\w+)\((?P<args>.*)"
                   r"|<\.\.\. (?P<resumed>\w+) resumed>(?P<rest>.*))$")
_INET = re.compile(r'sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]*)"\)')
_INET6 = re.compile(r'sa_family=AF_INET6, sin6_port=htons\((\d+)\), [^}]*?'
                    r'inet_pton\(AF_INET6, "([^"]*)"')
_UNIX = re.compile(r'sa_family=AF_UNIX, sun_path="([^"]*)"')
_RESULT = re.compile(r"\) += (-?\d+|\?)(?: (E[A-Z0-9]+))?")


def _outcome(text: str) -> str | None:
    """'ok', the errno name, or None while the call has not returned (`<unfinished ...>`)."""
    m = _RESULT.search(text)
    if m is None:
        return None
    return m.group(2) or ("ok" if m.group(1) != "-1" else "failed")


def _inet_target(port: int, host: str) -> tuple[str, bool] | None:
    """(target, a DNS query) for an IP destination worth recording, else None."""
    if ip_literal(host) is None:
        return None
    local = stays_local(host)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if port == DNS_PORT:
        # A name lookup even on loopback: 127.0.0.53 is systemd-resolved's stub on the host.
        return target, True
    return (target, False) if not local else None


def _targets(call: str, args: str, outcome: str | None) -> list[tuple[str, bool]]:
    found = [t for port, host in _INET.findall(args)
             if (t := _inet_target(int(port), host)) is not None]
    found += [t for port, host in _INET6.findall(args)
              if (t := _inet_target(int(port), host)) is not None]
    if call == "connect":
        for path in _UNIX.findall(args):
            if path == RESOLVED_SOCKET or (path in NSCD_SOCKETS and outcome == "ok"):
                found.append((path, True))
    return found


def parse_trace(lines: Iterable[str], component: str) -> list[dict[str, Any]]:
    """The attempts in an strace log (from `strace_argv`): IP destinations that are not
    loopback, DNS queries to any address, and connects to a name-resolving daemon."""
    records: list[dict[str, Any]] = []
    waiting: dict[str, list[dict[str, Any]]] = {}  # pid -> records of an unfinished call
    for line in lines:
        m = _CALL.match(line.rstrip("\n"))
        if m is None:
            continue
        pid = m.group("pid")
        if m.group("resumed"):
            outcome = _outcome(m.group("rest"))
            for r in waiting.pop(pid, []):
                r["result"] = outcome or "?"
                if r["target"] in NSCD_SOCKETS and outcome != "ok":
                    records = [x for x in records if x is not r]
            continue
        call, args = m.group("call"), m.group("args")
        unfinished = args.endswith("<unfinished ...>")
        outcome = None if unfinished else _outcome(args)
        # An unfinished connect to nscd may yet be accepted: keep it until it returns.
        pending = outcome if not unfinished else ("ok" if call == "connect" else None)
        for target, lookup in _targets(call, args, pending):
            r = {"time": float(m.group("time")), "pid": int(pid), "component": component,
                 "event": call, "target": target, "recorder": STRACE, "lookup": lookup,
                 "result": outcome or "?"}
            records.append(r)
            if unfinished:
                waiting.setdefault(pid, []).append(r)
    return records


def read_trace(log_path: Path, component: str) -> list[dict[str, Any]]:
    try:
        with log_path.open(errors="replace") as f:
            return parse_trace(f, component)
    except FileNotFoundError:
        return []


def read_log(log_path: Path) -> list[dict[str, Any]]:
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
