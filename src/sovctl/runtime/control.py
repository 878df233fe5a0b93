"""Operating a stack: run an admitted plan (in the foreground or under a detached supervisor),
report its status, stop it, find its logs. Admitting a plan, the checks before any start, is
the use-case layer's (`sovctl.ops.stack`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sovctl.errors import ConfigError, NotFoundError, RuntimeStartError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.runtime import switch
from sovctl.runtime.documents import (
    Event,
    MemoryBudget,
    ProcessState,
    StackState,
    Status,
    SwitchState,
)
from sovctl.runtime.plan import Plan, supervisor_env
from sovctl.runtime.procs import Argv, alive, group_alive, spawn, stop_group
from sovctl.runtime.supervisor import acquire_instance_lock, instance_running, run_plan
from sovctl.runtime.switch import SwitchRequest


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
                 log=home.logs / "supervisor.out", base_env=supervisor_env(plan))
    deadline = time.monotonic() + plan.supervision.start_timeout + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeStartError(
                f"the supervisor exited with code {proc.returncode} during start",
                hint=f"see {home.logs / 'supervisor.out'}",
            )
        st = status(home)
        # An on-demand model is ready unloaded: its first request loads it.
        if st.running and st.processes and all(p.status in (Status.UP, Status.UNLOADED)
                                               for p in st.processes):
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
    memory: MemoryBudget | None = None  # the budget its runtimes are admitted under
    switches: tuple[SwitchState, ...] = ()  # each model's last switch to other weights


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
            p, pid=None, status=Status.FAILED if p.status == Status.FAILED else Status.STOPPED,
            load_state="unloaded" if p.load_state else "", memory_held=None, vram_held=None)
            for p in procs)
    return StackStatus(running, st.supervisor_pid if running else None, st.url,
                       st.api_key_required, procs, st.events, st.memory, st.switches)


@dataclass(frozen=True)
class StopResult:
    was_running: bool
    stopped: tuple[str, ...]
    how: str  # "terminated" | "killed" | "not running"


def stop(home: Home, timeout: float = 20.0) -> StopResult:
    try:
        st = _read_state(home)
    except ConfigError:
        # A stack started by another sovctl version: its state is not read, but its supervisor
        # is still stopped (taking its children with it), never left running unowned.
        pid = _any_supervisor_pid(home)
        if pid is None or not instance_running(home.run):
            raise
        return _stop_supervisor(home, pid, (), None, timeout)
    if st is None or not instance_running(home.run):
        leftovers = _reap_leftovers(st)
        return StopResult(False, leftovers, "not running")
    return _stop_supervisor(home, st.supervisor_pid, tuple(p.name for p in st.processes), st,
                            timeout)


def _any_supervisor_pid(home: Home) -> int | None:
    """The supervisor's pid from a state file of any schema version (every one has it)."""
    try:
        pid = json.loads((home.run / "state.json").read_text()).get("supervisor_pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def _stop_supervisor(home: Home, pid: int, names: tuple[str, ...], st: StackState | None,
                     timeout: float) -> StopResult:
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
    return StopResult(True, names or ("supervisor",), how)


def _reap_leftovers(st: StackState | None) -> tuple[str, ...]:
    """Process groups a dead supervisor may have left (it should have left none)."""
    reaped = []
    # The runtimes of a switch under way too (sovctl.runtime.switch): the one starting, the
    # one finishing its requests.
    pids = [(p.name, p.pid) for p in st.processes] if st else []
    pids += [(s.name, pid) for s in (st.switches if st else ()) for pid in (s.old_pid, s.new_pid)]
    for name, pid in pids:
        if pid and group_alive(pid):
            stop_group(pid, timeout=5.0)
            reaped.append(name)
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


def switch_model(home: Home, request: SwitchRequest, timeout: float) -> SwitchState:
    """Ask the running stack's supervisor to serve a model from other weights, and wait until
    the switch is over (the old runtime stopped, or the switch given up) or, after `timeout`,
    until at least the new runtime serves. Its outcome as the supervisor tells it; a
    RuntimeStartError when there is none."""
    switch.ask(home.run, request)
    deadline = time.monotonic() + timeout
    seen: SwitchState | None = None
    while True:
        st = _read_state(home)
        seen = next((s for s in (st.switches if st else ()) if s.id == request.id), seen)
        if seen is not None and seen.over:
            return seen
        if not instance_running(home.run):
            raise RuntimeStartError(f"the stack stopped before switching {request.name}",
                                    hint="start it again with 'sovctl serve': it serves what "
                                    "the lock pins")
        if time.monotonic() >= deadline:
            if seen is not None and seen.phase == "draining":
                return seen  # served by the new weights; the old runtime ends with its requests
            raise RuntimeStartError(
                f"the switch of {request.name} did not finish within {timeout:.0f}s",
                hint=f"see 'sovctl status' and 'sovctl logs {request.name}'")
        time.sleep(0.05)
