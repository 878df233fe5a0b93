"""Operating a stack: start it (foreground or detached), report its status, stop it, find logs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sovctl.apikey import ensure_api_key
from sovctl.errors import BusyError, ConfigError, IntegrityError, NotFoundError, RuntimeStartError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.runtime import plan as planning
from sovctl.runtime.documents import Event, ProcessState, StackState, Status
from sovctl.runtime.plan import Plan
from sovctl.runtime.ports import ensure_free
from sovctl.runtime.procs import Argv, alive, group_alive, spawn, stop_group
from sovctl.runtime.supervisor import acquire_instance_lock, instance_running, run_plan
from sovctl.runtime.tunnel import pinned_keys
from sovctl.store.integrity import BlobCheck, check


def check_weights(home: Home, plan: Plan, full: bool) -> list[BlobCheck]:
    """Every served blob (a model's weights and its projector) against the lock; refuse to
    start on the first that fails. A projector's check is named MODEL/mmproj."""
    blobs = [(m.name, "", m.sha256, m.size) for m in plan.models]
    blobs += [(m.name, "/mmproj", m.mmproj_sha256, m.mmproj_size) for m in plan.models
              if m.mmproj]
    results = [(name, check(home, name + part, sha, size, full=full))
               for name, part, sha, size in blobs]
    for name, r in results:
        if not r.ok:
            what = "projector blob" if r.name != name else "blob"
            raise IntegrityError(
                f"refusing to serve {name!r}: its {what} is {r.status} "
                f"(lock sha256 {r.sha256[:12]}" + (f", found {r.actual})" if r.actual else ")"),
                hint=f"run 'sovctl verify {name}', then 'sovctl rm {name}' and pull it again",
            )
    return [r for _, r in results]


def prepare(home: Home, plan: Plan) -> None:
    """Refuse to start (a stack running, a port taken, an unpinned host key) or make the run
    directory ready."""
    home.ensure(home.run, home.logs)
    if instance_running(home.run):
        raise BusyError("a sovctl stack is already running from this home",
                        hint="see 'sovctl status', or stop it with 'sovctl stop'")
    if plan.tunnel is not None and not pinned_keys(plan.tunnel):
        raise ConfigError(f"the tunnel's host {plan.tunnel.host_key_name} has no pinned host key",
                          hint="pin it once with 'sovctl tunnel --pin-only', which shows its "
                          "fingerprint to confirm")
    what = {"gateway": "the gateway", "tunnel": "the tunnel's health probe",
            "worker": "the RPC worker"}
    for p in plan.processes:
        host = plan.host if p.kind in ("gateway", "worker") else "127.0.0.1"
        ensure_free(host, p.port, what.get(p.kind, f"runtime {p.name}"))
    # The saved plan is a detached supervisor's alone: a foreground stack leaves none, which is
    # how `sovctl tunnel` knows it cannot restart it.
    for stale in (plan.state_file, plan.egress_log, str(home.run / "plan.json")):
        Path(stale).unlink(missing_ok=True)
    planning.write_runtime_keys(plan)
    planning.write_routes(plan, home)


@dataclass(frozen=True)
class Admitted:
    """What a start was let through with: each served blob's check, and the API key where the
    gateway requires one (`api_key_created`: made just now, so it is shown once)."""

    weights: tuple[BlobCheck, ...]
    api_key: str | None
    api_key_created: bool
    api_key_file: Path | None


def admit(home: Home, plan: Plan, *, full_verify: bool = False) -> Admitted:
    """The one start sequence up to the launch, in its one order: the weights, then every other
    refusal (prepare), and only then the API key, so a refused start leaves no secret behind.
    `serve`, `up`, the audit, `tunnel` and `worker` all start through here."""
    weights = tuple(check_weights(home, plan, full=full_verify))
    prepare(home, plan)
    if not plan.api_key_required:
        return Admitted(weights, None, False, None)
    key, created = ensure_api_key(home)
    return Admitted(weights, key, created, home.secrets / "api_key")


def start(home: Home, plan: Plan, *, full_verify: bool = False) -> tuple[Admitted, StackStatus]:
    """Admit the plan, then start it detached."""
    admitted = admit(home, plan, full_verify=full_verify)
    return admitted, start_detached(home, plan)


def run_foreground(home: Home, plan: Plan, on_change: Callable[[StackState], None]) -> None:
    """Run an admitted plan in this process until it is stopped."""
    fd = acquire_instance_lock(home.run)
    try:
        run_plan(plan, on_change)
    finally:
        os.close(fd)


def start_detached(home: Home, plan: Plan) -> StackStatus:
    """Start an admitted plan under a detached supervisor; returns once every process is up."""
    plan_file = home.run / "plan.json"
    atomic_write(plan_file, plan.to_json().encode())
    proc = spawn(Argv((sys.executable, "-m", "sovctl.runtime.supervisor", str(plan_file)),
                      env={"PYTHONUNBUFFERED": "1"}),
                 log=home.logs / "supervisor.out", base_env=planning.supervisor_env(plan))
    deadline = time.monotonic() + float(plan.supervision["start_timeout"]) + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeStartError(
                f"the supervisor exited with code {proc.returncode} during start",
                hint=f"see {home.logs / 'supervisor.out'}",
            )
        st = status(home)
        if st.running and st.processes and all(p.status == Status.UP for p in st.processes):
            return st
        failed = [p.name for p in st.processes if p.status == Status.FAILED]
        if failed:
            stop(home)
            raise RuntimeStartError(
                f"{', '.join(failed)} failed to start and the stack was stopped",
                hint=f"see 'sovctl logs {failed[0]}'",
            )
        time.sleep(0.2)
    stop(home)
    raise RuntimeStartError("the stack did not become ready in time and was stopped",
                            hint="see 'sovctl logs' for each process")


@dataclass(frozen=True)
class StackStatus:
    running: bool
    supervisor_pid: int | None
    url: str | None
    api_key_required: bool
    processes: tuple[ProcessState, ...]
    events: tuple[Event, ...]


def _read_state(home: Home) -> StackState | None:
    return StackState.read(home.run / "state.json")


def status(home: Home) -> StackStatus:
    st = _read_state(home)
    running = instance_running(home.run)
    if st is None:
        return StackStatus(running, None, None, False, (), ())
    procs = st.processes
    if not running:
        # The last run's processes, as they are now: gone.
        procs = tuple(dataclasses.replace(
            p, pid=None, status=Status.FAILED if p.status == Status.FAILED else Status.STOPPED)
            for p in procs)
    return StackStatus(running, st.supervisor_pid if running else None, st.url,
                       st.api_key_required, procs, st.events)


@dataclass(frozen=True)
class StopResult:
    was_running: bool
    stopped: tuple[str, ...]
    how: str  # "terminated" | "killed" | "not running"


def stop(home: Home, timeout: float = 20.0) -> StopResult:
    st = _read_state(home)
    if st is None or not instance_running(home.run):
        leftovers = _reap_leftovers(st)
        return StopResult(False, leftovers, "not running")
    pid = st.supervisor_pid
    names = tuple(p.name for p in st.processes)
    how = "terminated"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while instance_running(home.run) and time.monotonic() < deadline:
        time.sleep(0.05)
    if instance_running(home.run) and alive(pid):
        os.kill(pid, signal.SIGKILL)
        how = "killed"
        while alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
    _reap_leftovers(st)
    return StopResult(True, names, how)


def _reap_leftovers(st: StackState | None) -> tuple[str, ...]:
    """Process groups a dead supervisor may have left (it should have left none)."""
    reaped = []
    for p in st.processes if st else ():
        if p.pid and group_alive(p.pid):
            stop_group(p.pid, timeout=5.0)
            reaped.append(p.name)
    return tuple(reaped)


def log_file(home: Home, name: str | None) -> Path:
    name = name or "supervisor"
    path = home.logs / f"{name}.log"
    if not path.exists():
        known = sorted(p.name.removesuffix(".log") for p in home.logs.glob("*.log")) \
            if home.logs.exists() else []
        raise NotFoundError(f"no log for {name!r}",
                            hint=f"logs available: {', '.join(known) or 'none yet'}")
    return path
