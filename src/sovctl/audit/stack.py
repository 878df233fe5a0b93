"""Starting the operator's stack for an audit: the same plan, weights check, supervisor and stop
as `sovctl serve --detach`, but with its run state in a directory of the audit's own, so an
audit never disturbs (nor is refused by) a stack the operator is running from the same home.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.apikey import read_api_key
from sovctl.config import Settings
from sovctl.errors import BusyError
from sovctl.home import Home
from sovctl.net import is_loopback
from sovctl.ops import stack as ops_stack
from sovctl.runtime import control, egress
from sovctl.runtime.control import StackStatus
from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.plan import Plan, build
from sovctl.runtime.ports import free_port
from sovctl.runtime.supervisor import instance_running

UNSPECIFIED = ("0.0.0.0", "::")


@dataclass(frozen=True)
class RunHome(Home):
    """The operator's home (store, lock, config, secrets) with run state and logs elsewhere."""

    run_root: Path = Path()

    @property
    def run(self) -> Path:
        return self.run_root / "run"

    @property
    def logs(self) -> Path:
        return self.run_root / "logs"


def audit_home(home: Home, purpose: str) -> RunHome:
    return RunHome(home.root, run_root=home.root / "audit" / purpose)


def fresh_run_dir(home: RunHome) -> None:
    """Start from an empty run directory; refuse if an audit stack still runs from it."""
    if instance_running(home.run):
        raise BusyError(f"another audit is running from this home ({home.run_root})",
                        hint="wait for it to finish")
    shutil.rmtree(home.run_root, ignore_errors=True)
    home.ensure(home.run, home.logs)


def plans(home: Home, run_home: RunHome, cfg: Settings, chat: Sequence[str],
          embedding: Sequence[str], egress_probe: str | None = None,
          rerank: Sequence[str] = ()) -> tuple[Plan, Plan]:
    """(the plan as configured, the plan the audit runs).

    The run plan is the configured one on an unused port, with its state under the audit's run
    directory. A gateway configured on a specific non-loopback address cannot bind inside a
    namespace that has only loopback: it runs on 127.0.0.1 there, and keeps the API key. A
    tunnel is left out: an audit stack has no public face (and a blackout no network to reach
    one), while its gateway still requires the key the tunnel demands. Its requests go to a
    ledger of the audit's own, not the operator's.
    """
    configured = build(home, cfg, chat, embedding, rerank=rerank)
    host = configured.host if (is_loopback(configured.host) or configured.host in UNSPECIFIED) \
        else "127.0.0.1"
    port = free_port()
    run = build(run_home, cfg, chat, embedding, rerank=rerank, egress_probe=egress_probe)
    procs = tuple(dataclasses.replace(p, port=port) if p.kind == ProcessKind.GATEWAY else p
                  for p in run.processes if p.kind != ProcessKind.TUNNEL)
    run = dataclasses.replace(run, host=host, port=port, processes=procs, tunnel=None,
                              api_key_required=configured.api_key_required,
                              ledger=str(run_home.run_root / "ledger" / "ledger.sqlite3"))
    return configured, run


def traced(plan: Plan, trace_dir: Path) -> Plan:
    """The plan with every process started under the system call tracer, each logging to
    TRACE_DIR/NAME.strace (see sovctl.runtime.launch)."""
    procs = tuple(dataclasses.replace(p, argv=dataclasses.replace(p.argv, env={
        **p.argv.env, egress.ENV_TRACE: str(trace_dir / f"{p.name}.strace")}))
        for p in plan.processes)
    return dataclasses.replace(plan, processes=procs)


def client_base(plan: Plan) -> str:
    host = "127.0.0.1" if plan.host in UNSPECIFIED else plan.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{plan.port}"


def auth_headers(home: Home, plan: Plan) -> dict[str, str]:
    if not plan.api_key_required:
        return {}
    key = read_api_key(home)
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class Ready:
    ok: bool
    polls: int
    seconds: float
    last: str  # the last answer: "200 {...}", "503 {...}" or the transport error
    body: Any = None


def wait_ready(base: str, headers: dict[str, str], timeout: float = 15.0) -> Ready:
    """Poll the gateway's /ready until it answers 200. The supervisor may see every process up
    a moment before the gateway re-reads its state (at most every 0.2 s)."""
    import time

    import httpx

    t0 = time.perf_counter()
    polls = 0
    while True:
        polls += 1
        try:
            r = httpx.get(base + "/ready", headers=headers, timeout=5, trust_env=False)
            last = f"{r.status_code} {r.text[:300]}"
            if r.status_code == 200:
                return Ready(True, polls, time.perf_counter() - t0, last, r.json())
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.perf_counter() - t0 >= timeout:
            return Ready(False, polls, time.perf_counter() - t0, last)
        time.sleep(0.1)


def start(home: RunHome, plan: Plan, *, full_verify: bool = False) -> StackStatus:
    """Exactly what `serve --detach` does after planning: the one start sequence."""
    return ops_stack.start(home, plan, full_verify=full_verify)[1]


def stop(home: RunHome) -> None:
    control.stop(home, timeout=float(20))
