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

from sovctl.errors import BusyError, IntegrityError, NotFoundError, RuntimeStartError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.runtime import plan as planning
from sovctl.runtime.documents import Event, ProcessState, StackState, Status
from sovctl.runtime.plan import Plan
from sovctl.runtime.ports import ensure_free
from sovctl.runtime.procs import Argv, alive, group_alive, spawn, stop_group
from sovctl.runtime.supervisor import acquire_instance_lock, instance_running, run_plan
from sovctl.store.integrity import BlobCheck, check


def check_weights(home: Home, plan: Plan, full: bool) -> list[BlobCheck]:
    """Every served blob against the lock; refuse to start on the first that fails."""
    results = [check(home, m.name, m.sha256, m.size, full=full) for m in plan.models]
    for r in results:
        if not r.ok:
            raise IntegrityError(
                f"refusing to serve {r.name!r}: its blob is {r.status} "
                f"(lock sha256 {r.sha256[:12]}" + (f", found {r.actual})" if r.actual else ")"),
                hint=f"run 'sovctl verify {r.name}', then 'sovctl rm {r.name}' and pull it again",
            )
    return results


def _prepare(home: Home, plan: Plan) -> None:
    home.ensure(home.run, home.logs)
    if instance_running(home.run):
        raise BusyError("a sovctl stack is already running from this home",
                        hint="see 'sovctl status', or stop it with 'sovctl stop'")
    for p in plan.processes:
        host = plan.host if p.kind == "gateway" else "127.0.0.1"
        ensure_free(host, p.port, "the gateway" if p.kind == "gateway" else f"runtime {p.name}")
    for stale in (plan.state_file, plan.egress_log):
        Path(stale).unlink(missing_ok=True)
    planning.write_runtime_keys(plan)
    planning.write_routes(plan, home)


def run_foreground(home: Home, plan: Plan, on_change: Callable[[StackState], None]) -> None:
    _prepare(home, plan)
    fd = acquire_instance_lock(home.run)
    try:
        run_plan(plan, on_change)
    finally:
        os.close(fd)


def start_detached(home: Home, plan: Plan) -> StackStatus:
    _prepare(home, plan)
    plan_file = home.run / "plan.json"
    atomic_write(plan_file, plan.to_json().encode())
    proc = spawn(Argv((sys.executable, "-m", "sovctl.runtime.supervisor", str(plan_file)),
                      env={"PYTHONUNBUFFERED": "1"}),
                 log=home.logs / "supervisor.out")
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
