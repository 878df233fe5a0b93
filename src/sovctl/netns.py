"""A network namespace with nothing but loopback, and the exact reason when one is refused.

Two ways in, both the same network isolation (a fresh namespace whose only interface is `lo`):

- `netns`: as root (CAP_SYS_ADMIN), `unshare(CLONE_NEWNET)`;
- `userns+netns`: as an ordinary user, `unshare(CLONE_NEWUSER | CLONE_NEWNET)` mapping the
  caller's own uid and gid, the equivalent of `unshare -rn`.

There is no weaker mode: where neither is allowed, `IsolationError` (exit code 8) says which
kernel setting or missing capability refused it and how to allow it.

`unshare(2)` with CLONE_NEWUSER needs a single-threaded caller, so `enter()` runs first thing in
a fresh process (`sovctl.audit.inside`), and `preflight()` tries it in a forked child. A leaf:
the blackout audit isolates itself with it, and `sovctl doctor` checks that it can.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from sovctl.errors import IsolationError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CAP_SYS_ADMIN = 21

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# Test switch: makes every namespace creation fail with EPERM, as an unprivileged container
# would, so the refusal path (message and exit code 8) can be exercised on a machine that allows
# namespaces. It never makes the audit pass; it can only make it refuse.
ENV_DENY = "SOVCTL_AUDIT_DENY_NAMESPACES"

MODES = ("netns", "userns+netns")


@dataclass(frozen=True)
class Attempt:
    mode: str  # "netns" | "userns+netns"
    errno: int  # 0 on success
    simulated: bool = False
    stage: str = "unshare"  # or the /proc file whose write failed

    @property
    def ok(self) -> bool:
        return self.errno == 0


def _unshare(flags: int) -> tuple[int, bool]:
    """(errno or 0, simulated)."""
    if os.environ.get(ENV_DENY) == "1":
        return errno.EPERM, True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) == 0:
        return 0, False
    return ctypes.get_errno(), False


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def loopback_up() -> None:
    """`ip link set lo up`, by ioctl: a new namespace's loopback starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


def _try(mode: str) -> Attempt:
    if mode == "netns":
        err, simulated = _unshare(CLONE_NEWNET)
        return Attempt(mode, err, simulated)
    uid, gid = os.getuid(), os.getgid()
    err, simulated = _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    if err:
        return Attempt(mode, err, simulated)
    # Map our own ids, so files written under the home keep their owner.
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        try:
            _write(path, text)
        except OSError as e:
            return Attempt(mode, e.errno or errno.EPERM, stage=path)
    return Attempt(mode, 0)


def _modes() -> tuple[str, ...]:
    return MODES if os.geteuid() == 0 else ("userns+netns",)


def enter() -> str:
    """Move this (single-threaded) process into a fresh network namespace with loopback up.
    Returns the mode used; raises IsolationError where no mode is allowed."""
    attempts = []
    for mode in _modes():
        a = _try(mode)
        if a.ok:
            loopback_up()
            return mode
        attempts.append(a)
    raise refusal(attempts)


def preflight() -> str:
    """Whether `enter()` will work, tried in a forked child so this process stays as it is."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only os-level calls, then _exit
        try:
            os.close(r)
            attempts = []
            mode = ""
            for m in _modes():
                a = _try(m)
                attempts.append([a.mode, a.errno, a.simulated, a.stage])
                if a.ok:
                    loopback_up()
                    mode = m
                    break
            os.write(w, json.dumps({"mode": mode, "attempts": attempts}).encode())
            os._exit(0)
        except BaseException as e:  # the parent explains; the child must _exit
            os.write(w, json.dumps({"mode": "", "attempts": [], "crash": repr(e)}).encode())
            os._exit(1)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"mode": "", "attempts": []}')
    if result["mode"]:
        return str(result["mode"])
    if result.get("crash"):
        raise IsolationError(f"could not set up the blackout's network namespace: "
                             f"{result['crash']}")
    raise refusal([Attempt(*a) for a in result["attempts"]])


def current_netns() -> str:
    """The identity of this process's network namespace, e.g. 'net:[4026531840]'."""
    return os.readlink("/proc/self/ns/net")


# -- explaining a refusal ----------------------------------------------------------------------

def _knob(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", name.replace(".", "/")).read_text().strip())
    except (OSError, ValueError):
        return None


def _has_cap(cap: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


def _explain_netns(err: int) -> tuple[str, list[str]]:
    if err == errno.EPERM:
        if not _has_cap(CAP_SYS_ADMIN):
            return ("running as root without CAP_SYS_ADMIN (typical of an unprivileged "
                    "container), so unshare(CLONE_NEWNET) is refused",
                    ["give the process CAP_SYS_ADMIN (for a container: --cap-add SYS_ADMIN)"])
        return ("unshare(CLONE_NEWNET) is refused although CAP_SYS_ADMIN is held: a seccomp "
                "profile or an LSM policy blocks namespace creation",
                ["allow unshare(2) in the seccomp/LSM policy (docker: "
                 "--security-opt seccomp=unconfined)"])
    if err in (errno.ENOSPC, errno.EUSERS):
        n = _knob("user.max_net_namespaces")
        return (f"the network namespace limit is reached (user.max_net_namespaces = {n})",
                ["sysctl -w user.max_net_namespaces=1024"])
    return (f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (a kernel without "
            "CONFIG_NET_NS?)", ["use a kernel with network namespaces (CONFIG_NET_NS)"])


def _explain_userns(err: int) -> tuple[str, list[str]]:
    max_users = _knob("user.max_user_namespaces")
    clone = _knob("kernel.unprivileged_userns_clone")
    apparmor = _knob("kernel.apparmor_restrict_unprivileged_userns")
    if err in (errno.ENOSPC, errno.EUSERS):
        if max_users == 0:
            return ("user namespaces are disabled: user.max_user_namespaces = 0",
                    ["sysctl -w user.max_user_namespaces=15000"])
        return (f"the user namespace limit is reached (user.max_user_namespaces = "
                f"{max_users})", ["sysctl -w user.max_user_namespaces=15000"])
    if err == errno.EPERM:
        if clone == 0:
            return ("unprivileged user namespaces are disabled: "
                    "kernel.unprivileged_userns_clone = 0",
                    ["sysctl -w kernel.unprivileged_userns_clone=1"])
        if apparmor == 1:
            return ("AppArmor restricts unprivileged user namespaces: "
                    "kernel.apparmor_restrict_unprivileged_userns = 1",
                    ["sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"])
        if max_users == 0:
            return ("user namespaces are disabled: user.max_user_namespaces = 0",
                    ["sysctl -w user.max_user_namespaces=15000"])
        return ("unshare(CLONE_NEWUSER|CLONE_NEWNET) is refused (EPERM) by the kernel or a "
                "seccomp/LSM policy (inside a container, or with "
                "kernel.unprivileged_userns_clone / user.max_user_namespaces restricted)",
                ["sysctl -w kernel.unprivileged_userns_clone=1",
                 "sysctl -w user.max_user_namespaces=15000"])
    return (f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {os.strerror(err)} (a kernel "
            "without CONFIG_USER_NS?)", ["use a kernel with user namespaces (CONFIG_USER_NS)"])


def refusal(attempts: list[Attempt]) -> IsolationError:
    reasons: list[str] = []
    fixes: list[str] = []
    for a in attempts:
        if a.simulated:
            why, how = (f"refused by the test switch {ENV_DENY}=1, which makes every "
                        "namespace creation fail with EPERM", [f"unset {ENV_DENY}"])
        elif a.stage != "unshare":
            why, how = (f"the user namespace was created, but writing {a.stage} failed: "
                        f"{os.strerror(a.errno)} (mapping uid 0 needs CAP_SETFCAP)",
                        ["run the audit as an ordinary user or as root with its capabilities"])
        else:
            why, how = (_explain_netns if a.mode == "netns" else _explain_userns)(a.errno)
        if a.simulated:
            if why not in reasons:
                reasons.append(why)
        else:
            label = "as root" if a.mode == "netns" else "in a user namespace"
            reasons.append(f"{label}: {why}")
        fixes += [f for f in how if f not in fixes]
    if os.geteuid() != 0:
        fixes.append("run the audit as root (sudo sovctl audit blackout)")
    message = ("cannot create the blackout's network namespace, so the audit did not run: "
               + "; ".join(reasons))
    hint = ("to allow it: " + ", or ".join(fixes)
            + ". sovctl never reports a blackout pass without a network namespace")
    return IsolationError(message, hint=hint)
