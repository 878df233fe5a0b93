"""`sovctl tunnel`: give the running stack its public face, or pin the public host's key.

The tunnel itself (its settings, the ssh process, host keys, why ssh stopped) is the core's
(`sovctl.runtime.tunnel`); here is the use case: pin the key, rehearse the path over a
throwaway tunnel, then restart the stack with the tunnel through the one start sequence
(`sovctl.ops.stack`), bringing the old stack back when the new one does not come up.
"""

from __future__ import annotations

import http.client
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sovctl import config
from sovctl.apikey import ensure_api_key
from sovctl.errors import RuntimeStartError, UsageError
from sovctl.home import Home
from sovctl.ops import stack
from sovctl.runtime import control
from sovctl.runtime.documents import ProcessKind, Status
from sovctl.runtime.plan import Plan, inherited_env
from sovctl.runtime.procs import Argv, spawn, stop_group
from sovctl.runtime.tunnel import (
    CONNECT_TIMEOUT,
    Confirm,
    SshFailure,
    Tunnel,
    diagnose,
    ensure_pinned,
    forward_confirmed,
    from_settings,
    gateway_address,
    probe_refused,
    process,
)

REHEARSAL_TIMEOUT = CONNECT_TIMEOUT + 15.0


def configured(home: Home, flags: Mapping[str, Any]) -> Tunnel:
    """The tunnel the configuration and the flags ask for; a UsageError without one."""
    t = from_settings(home, config.load(home, flags=flags))
    if t is None:
        raise UsageError("no public host to tunnel to",
                         hint="pass --via USER@HOST[:PORT], or set via in the [tunnel] section "
                         f"of {home.config_path}")
    return t



def rehearse(home: Home, t: Tunnel, timeout: float = REHEARSAL_TIMEOUT) -> None:
    """Carry one request over a throwaway tunnel before the stack is touched: its far end is a
    stub on loopback that answers a nonce, never the gateway, so nothing is exposed while
    the gateway may still take requests without the key. On a host that refuses the probe's
    way in, the host's confirmation of the remote forward is all there is to see, and enough.
    Raises ssh's reason when it fails."""
    nonce = secrets.token_hex(16).encode()

    class Nonce(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(nonce)))
            self.end_headers()
            self.wfile.write(nonce)

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: the stub's requests are the rehearsal's own."""

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Nonce)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    spec = process(t, "127.0.0.1", int(stub.server_address[1]), {})
    log = home.logs / "tunnel-check.log"
    home.ensure(home.logs)
    log.unlink(missing_ok=True)
    # The environment it would run with under the supervisor: no credential of this shell.
    proc = spawn(Argv(spec.argv.args, {"SOVCTL_SUPERVISOR_PID": str(os.getpid())}), log=log,
                 base_env=inherited_env(spec))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(spec.port, nonce):
                return
            said = log.read_text(errors="replace")
            if probe_refused(t, said) and forward_confirmed(t, said):
                return
            time.sleep(0.2)
    finally:
        stop_group(proc.pid, 3.0, proc)
        stub.shutdown()
        stub.server_close()
    failure = diagnose(t, log.read_text(errors="replace")) or SshFailure(
        f"the tunnel through {t.via} carried no request within {timeout:.0f}s", fatal=False)
    if not failure.hint:
        failure = replace(failure, hint=f"see {log}")
    raise failure.error()


def _answers(port: int, nonce: bytes) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().read() == nonce
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def with_tunnel(plan: Plan, t: Tunnel) -> Plan:
    """`plan` with this tunnel in place of any other, and its gateway behind the API key."""
    gateway = next(p for p in plan.processes if p.kind == ProcessKind.GATEWAY)
    procs = [p for p in plan.processes if p.kind != ProcessKind.TUNNEL]
    procs.append(process(t, plan.host, plan.port, gateway.argv.env))
    return replace(plan, processes=tuple(procs), tunnel=t, api_key_required=True)


@dataclass(frozen=True)
class Pinned:
    host: str  # as known_hosts names it
    known_hosts: str
    host_keys: tuple[str, ...]  # "TYPE SHA256:..."
    pinned_now: bool


@dataclass(frozen=True)
class Added:
    tunnel: Tunnel
    via: str
    public: str  # HOST:PORT where the public host listens for the gateway
    gateway: str  # where the tunnel delivers requests
    pid: int | None  # the ssh process
    pinned: Pinned
    restarted: bool  # the stack was restarted to take the tunnel
    api_key_file: str
    api_key_created: bool  # made just now, for this tunnel
    api_key: str | None  # the new key, to be shown once; None when it was not made now
    probe_skipped: str  # why the end-to-end probe cannot run; "" when it does


def pin_only(home: Home, flags: Mapping[str, Any], confirm: Confirm | None) -> Pinned:
    t = configured(home, flags)
    keys, now = ensure_pinned(t, confirm)
    return Pinned(t.host_key_name, t.known_hosts, tuple(map(str, keys)), now)


def add(home: Home, flags: Mapping[str, Any], confirm: Confirm | None) -> Added:
    """Add the tunnel to the running stack: pin the host key, rehearse the path, then restart
    the stack with the tunnel and its gateway requiring the API key (a supervisor takes no new
    process while it runs). Returns once the tunnel is up; on failure the stack runs as before."""
    t = configured(home, flags)
    st = control.status(home)
    if not st.running:
        raise RuntimeStartError("no stack is running from this home",
                                hint="start one with 'sovctl serve -d', then run 'sovctl tunnel' "
                                "again; or set [tunnel] in sovctl.toml and serve")
    saved = home.run / "plan.json"
    if not saved.is_file():
        raise RuntimeStartError(
            "the running stack was started in the foreground (or by systemd), and only a "
            "detached stack can be restarted with a tunnel",
            hint="set [tunnel] in sovctl.toml and restart it, or stop it and serve with -d")
    old = Plan.from_json(saved.read_text(), str(saved))
    keys, pinned_now = ensure_pinned(t, confirm)
    pinned = Pinned(t.host_key_name, t.known_hosts, tuple(map(str, keys)), pinned_now)
    running = next((p for p in st.processes if p.kind == ProcessKind.TUNNEL), None)
    live = old.tunnel if running is not None and running.status == Status.UP else None
    key_file = str(home.secrets / "api_key")
    if live == t:
        assert running is not None
        return Added(t, t.via, t.public, f"{gateway_address(old.host)}:{old.port}",
                     running.pid, pinned, False, key_file, False, None, running.probe_skipped)
    if live is None or (live.host, live.port, live.remote_port) != (t.host, t.port,
                                                                    t.remote_port):
        # A live tunnel to the same port would hold it against the rehearsal; the start below
        # is then the test, and a failure brings the old stack back.
        rehearse(home, t)
    new = with_tunnel(old, t)
    key, created = ensure_api_key(home)
    control.stop(home)
    try:
        _, up = stack.start(home, new)
    except RuntimeStartError as e:
        last = control.status(home)
        why = next((p.last_exit for p in last.processes
                    if p.kind == ProcessKind.TUNNEL and p.last_exit),
                   e.message)
        stack.start(home, old)
        raise RuntimeStartError(f"the tunnel through {t.via} did not come up ({why}); the "
                                "stack was restarted as it was", hint="see 'sovctl logs tunnel'"
                                ) from e
    ssh = next(p for p in up.processes if p.kind == ProcessKind.TUNNEL)
    return Added(t, t.via, t.public, f"{gateway_address(new.host)}:{new.port}", ssh.pid, pinned,
                 True, key_file, created, key if created else None, ssh.probe_skipped)
