"""The stack's public face: an SSH reverse tunnel from a host the operator owns to the gateway.

The tunnel is one more supervised process, a plain `ssh -N -R ...` that exits when a forward
cannot be set up. Beside the public forward it holds a private one, `-L PROBE:...:REMOTE_PORT`,
whose local end the supervisor's health probe calls: the probe's request crosses the SSH
session, enters the public host's listening port and comes back through the reverse forward to
the gateway's /health. A tunnel therefore counts as up only when the public side reaches the
gateway, and the probe's port is the ssh process's own, as every health probe demands.

A hardened public host (sshd's `AllowTcpForwarding remote`, the least a reverse tunnel needs)
refuses that private forward. The tunnel then runs without the end-to-end probe, and says so:
it counts as up once ssh reports the public host's confirmation of the remote forward, whose
refusal or loss ends ssh (ExitOnForwardFailure).

The public host's key is checked against HOME/tunnel/known_hosts, written only once the
operator has confirmed the key's fingerprint; ssh never learns a key by itself there.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sovctl.config import Settings
from sovctl.errors import (
    ConfigError,
    IntegrityError,
    NetworkError,
    SovctlError,
    UsageError,
)
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.net import ip_literal, is_loopback
from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.ports import free_port
from sovctl.runtime.procs import Argv, ProcessSpec

NAME = "tunnel"  # the process's name in the plan, `sovctl status` and `sovctl logs`
CONNECT_TIMEOUT = 15  # seconds ssh waits for the public host before it exits (and is retried)
SSH_HINT = "install the OpenSSH client (Debian: apt-get install openssh-client)"
# Remote bind addresses that mean every interface of the public host: the probe enters there
# through its loopback.
ANY_ADDRESS = ("", "*", "0.0.0.0", "::", "localhost")

_VIA = re.compile(r"(?:(?P<user>[^@]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:@\[\]]+))"
                  r"(?::(?P<port>\d{1,5}))?")
# A user or host name ssh cannot mistake for an option, nor split into two arguments.
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _valid_host(host: str) -> bool:
    return ip_literal(host) is not None or bool(_HOST.fullmatch(host))


def parse_via(via: str) -> tuple[str, str, int] | None:
    """(user, host, SSH port) of `[USER@]HOST[:PORT]` (an IPv6 address in brackets); None when
    `via` is not one."""
    m = _VIA.fullmatch(via.strip())
    if m is None:
        return None
    user, host, port = m["user"] or "", m["v6"] or m["host"], int(m["port"] or 22)
    if (user and not _USER.fullmatch(user)) or not _valid_host(host) or not 0 < port < 65536:
        return None
    return user, host, port


@dataclass(frozen=True)
class Tunnel:
    """The [tunnel] settings, checked and resolved: where the tunnel goes and how ssh holds it."""

    user: str  # "" = ssh's default, the local user's name
    host: str
    port: int  # the public host's SSH port
    remote_port: int  # the port the public host listens on for the gateway
    remote_bind: str  # the address it listens on there; "" = as its GatewayPorts says
    identity: str  # the private key file; "" = ssh's default keys
    known_hosts: str  # the pinned host keys
    keepalive_interval: int
    keepalive_count: int

    @property
    def via(self) -> str:
        return (f"{self.user}@" if self.user else "") + f"{_bracket(self.host)}:{self.port}"

    @property
    def host_key_name(self) -> str:
        """The host as ssh names it in known_hosts: `[HOST]:PORT` unless the port is 22."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def public(self) -> str:
        """Where the public host listens for the gateway (behind its own proxy, if any)."""
        return f"{_bracket(self.host)}:{self.remote_port}"

    @property
    def probe_host(self) -> str:
        """The address on the public host that the probe's private forward connects to."""
        return "127.0.0.1" if self.remote_bind in ANY_ADDRESS else self.remote_bind


def known_hosts_path(home: Home) -> Path:
    return home.root / "tunnel" / "known_hosts"


def from_settings(home: Home, cfg: Settings) -> Tunnel | None:
    """The tunnel [tunnel] (or the flags) asks for; None without `via`."""
    via = cfg.tunnel.via.strip()
    if not via:
        return None
    # Flags are usage; anything from a file or the environment is configuration.
    error = UsageError if cfg.source("tunnel.via") == "flag" else ConfigError
    parsed = parse_via(via)
    if parsed is None:
        raise error(f"tunnel target {via!r} is not USER@HOST[:PORT]",
                    hint="for example tunnel@vps.example.org, or tunnel@[2001:db8::1]:2222")
    user, host, port = parsed
    remote_port = cfg.tunnel.remote_port
    if not 0 < remote_port < 65536:
        raise error(f"tunnel.remote_port must be a port number (1-65535), got {remote_port}")
    bind = cfg.tunnel.remote_bind.strip()
    if bind not in ANY_ADDRESS and not _valid_host(bind):
        raise ConfigError(f"tunnel.remote_bind {bind!r} is not an address",
                          hint="leave it empty (the public host's GatewayPorts decides), or give "
                          "an address of the public host such as 127.0.0.1 or 0.0.0.0")
    identity = cfg.tunnel.identity.strip()
    if identity:
        path = Path(identity).expanduser()
        if not path.is_file():
            raise error(f"tunnel identity {identity} is not a file",
                        hint="give the private key ssh logs in to the public host with")
        identity = str(path.resolve())
    keepalive = (cfg.tunnel.keepalive_interval, cfg.tunnel.keepalive_count)
    if min(keepalive) < 1:
        raise ConfigError("tunnel.keepalive_interval and tunnel.keepalive_count must be at "
                          f"least 1, got {keepalive[0]} and {keepalive[1]}")
    return Tunnel(user=user, host=host, port=port, remote_port=remote_port, remote_bind=bind,
                  identity=identity, known_hosts=str(known_hosts_path(home)),
                  keepalive_interval=keepalive[0], keepalive_count=keepalive[1])


# -- the ssh process -------------------------------------------------------------------------------

def host_key_options(t: Tunnel) -> tuple[str, ...]:
    """The `-o` settings that hold ssh to the pinned key (the audit looks for each of them)."""
    return (
        "StrictHostKeyChecking=yes",
        # Quoted: ssh splits an unquoted value at spaces into several files.
        f'UserKnownHostsFile="{t.known_hosts}"',
        "GlobalKnownHostsFile=/dev/null",  # only the key the operator confirmed counts
        "UpdateHostKeys=no",  # the public host cannot add keys to the pin
    )


def gateway_address(host: str) -> str:
    """Where the tunnel's far end connects to reach a gateway bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    if ip_literal(host) is None and is_loopback(host):
        return "127.0.0.1"  # a loopback name: the gateway listens on its address
    return host


def gateway_target(host: str, port: int) -> str:
    """`ADDRESS:PORT` as the tunnel's `-R` ends: the gateway it delivers to."""
    return f"{_bracket(gateway_address(host))}:{port}"


# The function of ssh that logs the public host's answer to the remote forward, at debug level:
# "remote forward success for: listen [BIND:]PORT, connect HOST:PORT".
_CONFIRM_FUNCTION = "ssh.c:ssh_confirm_remote_forward():*"


def ssh_argv(t: Tunnel, ssh: str, target: tuple[str, int], probe_port: int,
             env: Mapping[str, str]) -> Argv:
    """`ssh -N -R` from the public host's port to `target`, with the probe's `-L`, started
    through the launcher like every supervised program (death with the supervisor)."""
    listen = f"{_bracket(t.remote_bind)}:{t.remote_port}" if t.remote_bind else str(t.remote_port)
    options = (
        # Any forward that cannot be set up ends ssh, where the supervisor sees it; a silent
        # ssh without its forward would look alive.
        "ExitOnForwardFailure=yes",
        # The host's confirmation of the remote forward, and that line alone of ssh's debug
        # output: the proof that the public port listens, where the probe cannot enter it.
        # IgnoreUnknown: an ssh older than 8.5 has no LogVerbose, and would refuse to start.
        "IgnoreUnknown=LogVerbose",
        f"LogVerbose={_CONFIRM_FUNCTION}",
        f"ServerAliveInterval={t.keepalive_interval}",
        f"ServerAliveCountMax={t.keepalive_count}",
        f"ConnectTimeout={CONNECT_TIMEOUT}",
        *host_key_options(t),
        "BatchMode=yes",  # never a prompt: nobody is there to answer it
        "IdentitiesOnly=yes",  # the key given, not whatever an agent holds
    )
    args = [
        ssh, "-N",
        # The plan alone decides: no ~/.ssh/config or /etc/ssh/ssh_config, where a
        # ProxyCommand, an extra forward or a relaxed host key check would change the path.
        "-F", "/dev/null",
        *(a for o in options for a in ("-o", o)),
        *(("-i", t.identity) if t.identity else ()),
        "-p", str(t.port),
        "-R", f"{listen}:{_bracket(target[0])}:{target[1]}",
        "-L", f"127.0.0.1:{probe_port}:{_bracket(t.probe_host)}:{t.remote_port}",
        "--", (f"{t.user}@" if t.user else "") + t.host,
    ]
    return Argv((sys.executable, "-m", "sovctl.runtime.launch", NAME, "--exec", *args),
                env=dict(env))


def process(t: Tunnel, gateway_host: str, gateway_port: int, env: Mapping[str, str]
            ) -> ProcessSpec:
    """The tunnel as a supervised process to the gateway at gateway_host:gateway_port; its
    port is the probe's local end, which answers with the gateway's /health."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise ConfigError("the tunnel needs ssh, and no ssh was found on PATH", hint=SSH_HINT)
    probe = free_port()
    return ProcessSpec(name=NAME, kind=ProcessKind.TUNNEL, port=probe, health_path="/health",
                       argv=ssh_argv(t, ssh, (gateway_address(gateway_host), gateway_port),
                                     probe, env))


def forwards(args: Sequence[str]) -> list[tuple[str, str]]:
    """The (flag, spec) of every forward an ssh command line asks for: -R, -L and -D."""
    found = []
    for i, a in enumerate(args[:-1]):
        if a in ("-R", "-L", "-D"):
            found.append((a, args[i + 1]))
    return found


# -- host keys -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostKey:
    type: str  # "ssh-ed25519", "ecdsa-sha2-nistp256", ...
    key: str  # base64, as known_hosts holds it

    @property
    def fingerprint(self) -> str:
        """As `ssh-keygen -l` and ssh's own messages show it."""
        digest = hashlib.sha256(base64.b64decode(self.key)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def __str__(self) -> str:
        return f"{self.type} {self.fingerprint}"


def _parse_keys(text: str, name: str) -> list[HostKey]:
    keys = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith(("#", "@")) \
                and name in fields[0].split(","):
            keys.append(HostKey(fields[1], fields[2]))
    return keys


def pinned_keys(t: Tunnel) -> list[HostKey]:
    try:
        return _parse_keys(Path(t.known_hosts).read_text(), t.host_key_name)
    except FileNotFoundError:
        return []


def scan(t: Tunnel, timeout: int = 10) -> list[HostKey]:
    """The keys the public host offers now (unauthenticated: only the operator's confirmation
    of a fingerprint makes them trusted)."""
    keyscan = shutil.which("ssh-keyscan")
    if keyscan is None:
        raise ConfigError("pinning the tunnel's host key needs ssh-keyscan, and none was found",
                          hint=SSH_HINT)
    proc = subprocess.run([keyscan, "-T", str(timeout), "-p", str(t.port), "--", t.host],
                          capture_output=True, text=True, timeout=timeout + 5, check=False)
    keys = _parse_keys(proc.stdout, t.host_key_name)
    if not keys:
        said = [line for line in proc.stderr.splitlines() if line and not line.startswith("#")]
        raise NetworkError(f"no host key from {t.host_key_name}"
                           + (f": {said[-1]}" if said else ""),
                           hint=f"check that {t.host} runs sshd on port {t.port} and that this "
                           "machine reaches it")
    return keys


def pin(t: Tunnel, keys: Sequence[HostKey]) -> None:
    path = Path(t.known_hosts)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    old = path.read_text() if path.exists() else ""
    lines = "".join(f"{t.host_key_name} {k.type} {k.key}\n" for k in keys)
    atomic_write(path, (old + ("\n" if old and not old.endswith("\n") else "") + lines).encode(),
                 mode=0o600)


# Asked with the host's name and the keys it offers; True pins them.
Confirm = Callable[[str, Sequence[HostKey]], bool]


def ensure_pinned(t: Tunnel, confirm: Confirm | None) -> tuple[list[HostKey], bool]:
    """(the pinned keys, whether they were pinned just now). `confirm` None: nobody can be
    asked, and an unpinned key is an error that shows its fingerprint."""
    keys = pinned_keys(t)
    if keys:
        return keys, False
    keys = scan(t)
    offered = ", ".join(map(str, keys))
    if confirm is None:
        raise UsageError(f"the host key of {t.host_key_name} is not pinned yet; it offers "
                         f"{offered}",
                         hint="compare the fingerprint with the host's own (on the host: "
                         "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then run again "
                         "with --accept-host-key, or in a terminal to confirm it")
    if not confirm(t.host_key_name, keys):
        raise UsageError(f"the host key of {t.host_key_name} was not accepted; nothing was "
                         "pinned or changed")
    pin(t, keys)
    return keys, True


# -- why ssh stopped -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SshFailure:
    message: str
    fatal: bool  # no retry can cure it: the operator has to act
    hint: str = ""
    host_key: bool = False  # the host did not prove to be the pinned one

    def error(self) -> SovctlError:
        cls = IntegrityError if self.host_key else NetworkError
        return cls(self.message, hint=self.hint or None)


def diagnose(t: Tunnel, output: str) -> SshFailure | None:
    """Why ssh stopped, from what it wrote since its start; None when it said nothing."""
    kh, name = t.known_hosts, t.host_key_name
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in output:
        m = re.search(r"sent by the remote host is\s+(SHA256:[A-Za-z0-9+/]+)", output)
        offered = f" (it now offers {m[1]})" if m else ""
        return SshFailure(
            f"the host key of {name} changed: it is not the key pinned in {kh}{offered}, so "
            "ssh refused to connect (REMOTE HOST IDENTIFICATION HAS CHANGED)", fatal=True,
            host_key=True,
            hint="someone may be impersonating the host; if its key was replaced on purpose, "
            "compare the fingerprint on the host, remove the old pin with "
            f"ssh-keygen -R '{name}' -f {kh}, and run 'sovctl tunnel' again")
    if "Host key verification failed" in output:
        return SshFailure(f"no host key of {name} is pinned in {kh}, so ssh refused to connect",
                          fatal=True, host_key=True,
                          hint="pin it with 'sovctl tunnel --pin-only', which shows its "
                          "fingerprint to confirm")
    # A refused probe is no reason for ssh to stop (see probe_refused): never the one given.
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and _PROBE_REFUSED not in line]
    denied = next((line for line in lines if "Permission denied" in line), None)
    if denied:
        return SshFailure(f"{t.via} refused the login: {denied}", fatal=True,
                          hint="add the tunnel's public key to that user's authorized_keys on "
                          "the public host (see docs/commands/tunnel.md)")
    if "remote port forwarding failed" in output:
        return SshFailure(
            f"{t.via} did not let ssh listen on port {t.remote_port}: it is in use, or not "
            "permitted", fatal=False,
            hint=f'allow it in the key\'s authorized_keys line: permitlisten="{t.remote_port}"; '
            "an old session may hold the port until the host's ClientAliveInterval ends it")
    return SshFailure(f"ssh: {lines[-1].removeprefix('ssh: ')}", fatal=False) if lines else None


# What ssh says when the public host refuses a channel it opens: only the probe's -L opens one
# (the public forward's channels are opened by the host).
_PROBE_REFUSED = "administratively prohibited"


def probe_refused(t: Tunnel, output: str) -> str | None:
    """Why the end-to-end probe cannot run, when ssh's output since its start shows the public
    host refusing the probe's way in; None otherwise."""
    if _PROBE_REFUSED not in output:
        return None
    target = f"{t.probe_host}:{t.remote_port}"
    return (f"{t.via} refuses the local forward to {target} that the end-to-end probe enters "
            "by (sshd's AllowTcpForwarding is remote, or the key's permitopen leaves it out), so "
            "the tunnel's health is ssh holding the remote forward the host confirmed; for the "
            "end-to-end probe, set AllowTcpForwarding yes for the tunnel's user there, with "
            f'permitopen="{target}"')


def forward_confirmed(t: Tunnel, output: str) -> bool:
    """Whether ssh's output since its start has the public host confirming the remote forward:
    its port then listens. Without that, ExitOnForwardFailure ends ssh."""
    return re.search(rf"remote forward success for: listen (?:\S+:)?{t.remote_port},",
                     output) is not None
