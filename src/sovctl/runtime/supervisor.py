"""The supervisor: starts every process of a plan, health-checks them, restarts the ones that
crash or hang (with exponential backoff), marks a crash-looping one failed while the rest keep
serving, and on stop leaves nothing behind.

It spawns children only from its main thread: each child asks the kernel (PDEATHSIG) to be
killed when that thread's process dies, so a SIGKILLed supervisor orphans nothing.
Run detached as `python -m sovctl.runtime.supervisor PLAN.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from sovctl.errors import BusyError, SovctlError
from sovctl.fsutil import atomic_write
from sovctl.runtime import cluster, demand, memory, switch
from sovctl.runtime.documents import (
    MEMORY_BUSY,
    MEMORY_HELD,
    Event,
    LoadState,
    ProcessKind,
    ProcessState,
    StackState,
    Status,
    SwitchState,
    WorkerState,
    WorkerStatus,
)
from sovctl.runtime.launch import WAIT_ENV
from sovctl.runtime.logfiles import Pump, RotatingLog
from sovctl.runtime.plan import ON_DEMAND, Plan, inherited_env, provider_keys
from sovctl.runtime.ports import free_port, listener, owned_by
from sovctl.runtime.procs import Argv, ProcessSpec, spawn, stop_group
from sovctl.runtime.tunnel import diagnose, forward_confirmed, probe_refused
from sovctl.units import human_bytes


@dataclass
class _Proc:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes] | None = None
    # An on-demand runtime's launch started ahead of its load, waiting for a byte on `go`
    # (launch.WAIT_ENV): a load then costs no interpreter start-up. Its output pipe, and the
    # argv it was started with (a switch to other weights makes it stale).
    spare: subprocess.Popen[bytes] | None = None
    spare_go: int | None = None
    spare_out: int | None = None
    spare_args: tuple[str, ...] = ()
    next_spare: float = 0.0  # monotonic: not before (it would compete with a load for CPU)
    status: Status = Status.PENDING
    started_at: float = 0.0
    up_since: float | None = None  # wall clock of the first healthy check since this start
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)
    probe_failures: int = 0
    next_start: float = 0.0
    next_probe: float = 0.0
    last_exit: str = ""
    probe: Future[Probe] | None = None
    workers: dict[str, WorkerState] = field(default_factory=dict)  # a clustered runtime's
    rejoin: Future[list[cluster.WorkerHealth]] | None = None  # asking its lost workers again
    next_rejoin: float = 0.0
    watch: Future[set[str] | None] | None = None  # which workers the runtime is connected to
    next_watch: float = 0.0
    connected: set[str] = field(default_factory=set)  # workers seen connected since this start
    unprobed: str = ""  # a tunnel whose public host refuses its end-to-end probe: why
    next_idle: float = 0.0  # an on-demand runtime's next look at its idleness (monotonic)
    loaded_at: float = 0.0  # wall clock of its last start
    loads: int = 0  # starts that came up, and the seconds from each start to healthy
    load_seconds: float = 0.0
    unloads: int = 0
    evictions: int = 0
    unload_reason: str = ""
    memory_wait: str = ""  # why a requested load waits for memory (MEMORY_BUSY or _HELD)
    memory_wait_kind: str = ""
    held: tuple[int | None, int | None] = (None, None)  # (RSS, VRAM) measured at the last look
    # Beside a model's name, what its log pump is known by: "" for the runtime serving it, else
    # that of a runtime starting to replace it ("~next") or finishing its last requests ("~old").
    tag: str = ""

    @property
    def key(self) -> str:
        return self.spec.name + self.tag

    def holds_memory(self) -> bool:
        """Whether its estimate counts against the budget: running, or about to run again."""
        return self.spec.kind == ProcessKind.RUNTIME and self.status not in (
            Status.UNLOADED, Status.FAILED, Status.STOPPED)


@dataclass
class _Switch:
    """A model being switched to other weights: its new runtime starting beside the old one,
    then the old one finishing its requests in flight (see sovctl.runtime.switch)."""

    request: switch.SwitchRequest
    old: _Proc
    new: _Proc
    from_sha256: str
    started_at: float  # wall clock
    phase: str = "starting"  # then "draining"
    old_port: int = 0
    served_at: float = 0.0  # monotonic: when the new runtime took the model's requests


def _switched_argv(argv: Argv, blob: str, port: int) -> Argv:
    """The same runtime's argv serving another blob on another port: every engine names the
    two by flag (sovctl.engines), and nothing else of it changes, its key file included."""
    args = list(argv.args)
    for flag, value in (("--model", blob), ("--port", str(port))):
        args[args.index(flag) + 1] = value
    return replace(argv, args=tuple(args))


# How often a clustered runtime running without some of its workers asks them again.
REJOIN_INTERVAL = 10.0
# How often a clustered runtime's connections to its workers are looked at (see _watch).
WATCH_INTERVAL = 2.0
# A load waiting for memory is given up when no request has asked for it this long.
WANT_TTL = 1.0
# Seconds between tries at starting a model's spare launch. One is started as soon as its model
# is unloaded: alternating models reload each other within a second, and the spare's start-up
# (about 25 ms of one CPU) costs a load that overlaps it less than it saves the next one.
SPARE_DELAY = 1.0
# The main loop's pace (seconds), and while a process starts (an on-demand load has a request
# waiting for it).
TICK = 0.05
STARTING_TICK = 0.005


def _mem(ram: int, vram: int) -> str:
    return human_bytes(ram) + (f" + {human_bytes(vram)} VRAM" if vram else "")


class Probe(Enum):
    OK = "ok"
    FAILED = "failed"
    FOREIGN = "foreign"  # something answers, but not our child: another server holds the port


def _probe(url: str, timeout: float, pid: int) -> Probe:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path)
        answered = conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return Probe.FAILED
    finally:
        conn.close()
    if not answered:
        return Probe.FAILED
    # Checked after the answer: a child still binding is simply not healthy yet.
    return Probe.OK if owned_by(pid, parts.port or 80) else Probe.FOREIGN


def _probe_listening(pid: int, port: int) -> Probe:
    """An RPC worker's health: its own socket listens. Its protocol serves one client at a
    time with a backlog of one, so a probe connecting while a head holds it would queue, and
    a few queued probes would keep even the head's reconnection out."""
    if owned_by(pid, port):
        return Probe.OK
    return Probe.FOREIGN if listener(port) is not None else Probe.FAILED


def already_running() -> BusyError:
    """The refusal to start a second stack from one home."""
    return BusyError("a sovctl stack is already running from this home",
                     hint="see 'sovctl status', or stop it with 'sovctl stop'")


def acquire_instance_lock(run_dir: Path) -> int:
    """Hold run/supervisor.lock for the supervisor's lifetime: one stack per home."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise already_running() from None
    os.set_inheritable(fd, False)
    return fd


def instance_running(run_dir: Path) -> bool:
    path = run_dir / "supervisor.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Supervisor:
    def __init__(self, plan: Plan, on_change: Callable[[StackState], None] | None = None,
                 ) -> None:
        self.plan = plan
        self.cfg = plan.supervision
        self.procs = [_Proc(spec) for spec in plan.processes]
        self.stopping = False
        self.on_change = on_change
        self.events: deque[Event] = deque(maxlen=20)
        self.started_at = time.time()
        self._probes = ThreadPoolExecutor(max_workers=max(2, len(self.procs)),
                                          thread_name_prefix="probe")
        # Each process's log (and the supervisor's own events, "supervisor"), kept across its
        # restarts, and what reads the output of its current start into it.
        self._logs: dict[str, RotatingLog] = {}
        self._pumps: dict[str, Pump] = {}
        self._provider_keys = provider_keys(plan)
        self._last_keyed: list[object] = []
        self._run = Path(plan.state_file).parent
        self._on_demand = {p.spec.name: p for p in self.procs if p.spec.load == ON_DEMAND}
        self._waker: demand.Waker | demand.Sleeper = demand.Sleeper()
        # Loads asked for and not yet started for want of memory: name -> when last asked
        # (monotonic). A waiting request asks again every 0.1 s; one not asked for in
        # WANT_TTL has no request left waiting.
        self._wanted: dict[str, float] = {}
        self._gpus = plan.memory.vram > 0  # NVML saw a GPU when the plan was made
        # Models being switched to other weights (sovctl.runtime.switch), and the outcome of
        # the last switch of each.
        self._switching: dict[str, _Switch] = {}
        self._switched: dict[str, SwitchState] = {}
        self._next_switch_look = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> None:
        if self._on_demand:
            demand.prepare(self._run)
            self._waker = demand.Waker(self._run)
        switch.prepare(self._run)
        for p in self.procs:
            if p.spec.load == ON_DEMAND:
                p.status = Status.UNLOADED  # the first request for it loads it
            else:
                self._start(p)
        interval = self.cfg.health_interval
        next_state = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if self._on_demand:
                    self._on_demand_tick(now)
                self._switch_tick(now, interval)
                for p in self.procs:
                    self._tick(p, now, interval)
                if now >= next_state or self._state_changed():
                    self._write_state()
                    next_state = now + interval
                # A request asking for a load wakes the loop at once (demand.Waker); a start
                # in progress is looked at every STARTING_TICK, to notice its health at once.
                self._waker.wait(STARTING_TICK if any(
                    q.status == Status.STARTING for q in self.procs) else TICK)
        finally:
            self._waker.close()
            self._stop_all()
            self._probes.shutdown(wait=False, cancel_futures=True)
            self._write_state(final=True)
            for pump in self._pumps.values():
                pump.drain(timeout=2.0)  # the children's last words reach their logs
            for log in self._logs.values():
                log.close()

    def _event(self, proc: str, what: str) -> None:
        self.events.append(Event(time.time(), proc, what))
        self._log("supervisor").write(
            (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f" {proc}: {what}\n").encode())

    def _log(self, name: str) -> RotatingLog:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = RotatingLog(Path(self.plan.logs_dir) / f"{name}.log",
                                                 self.cfg.log_max_bytes,
                                                 self.cfg.log_backups)
        return log

    def _spawn(self, p: _Proc, argv: Argv, stdin: int | None = None
               ) -> tuple[subprocess.Popen[bytes], int]:
        """Start `argv` as `p`'s process: (it, the read end of the pipe it writes its output
        into, which the supervisor reads into its log so the log can be rotated while it runs).
        Raises OSError."""
        env = {**argv.env, "SOVCTL_SUPERVISOR_PID": str(os.getpid())}
        out, into = os.pipe()
        try:
            popen = spawn(Argv(argv.args, env, argv.cwd), out=into,
                          base_env=inherited_env(p.spec, self._provider_keys), stdin=stdin)
        except OSError:
            os.close(out)
            raise
        finally:
            os.close(into)
        return popen, out

    def _make_spare(self, p: _Proc) -> None:
        """Start `p`'s launch ahead of its load, waiting (see _Proc.spare)."""
        argv = p.spec.argv
        go_read, go = os.pipe()
        try:
            p.spare, p.spare_out = self._spawn(
                p, Argv(argv.args, {**argv.env, WAIT_ENV: "1"}, argv.cwd), stdin=go_read)
        except OSError:
            os.close(go)
            return  # its load will start it the usual way
        finally:
            os.close(go_read)
        p.spare_go, p.spare_args = go, argv.args

    def _drop_spare(self, p: _Proc) -> None:
        """End a spare launch unused: at end of its input it exits."""
        if p.spare is None:
            return
        assert p.spare_go is not None and p.spare_out is not None
        os.close(p.spare_go)
        stop_group(p.spare.pid, 1.0, p.spare)
        os.close(p.spare_out)
        p.spare, p.spare_go, p.spare_out = None, None, None

    def _take_spare(self, p: _Proc, argv: Argv) -> tuple[subprocess.Popen[bytes], int] | None:
        """The spare launch, told to run now, when it is alive and runs `argv`."""
        spare, go, out = p.spare, p.spare_go, p.spare_out
        if spare is None or go is None or out is None:
            return None
        if spare.poll() is not None or p.spare_args != argv.args:
            self._drop_spare(p)
            return None
        p.spare, p.spare_go, p.spare_out = None, None, None
        try:
            os.write(go, b"!")
        except OSError:
            os.close(out)
            stop_group(spare.pid, 1.0, spare)
            return None
        finally:
            os.close(go)
        return spare, out

    def _start(self, p: _Proc) -> None:
        argv = self._with_live_workers(p) if p.spec.workers else p.spec.argv
        taken = self._take_spare(p, argv)
        if taken is None:
            try:
                taken = self._spawn(p, argv)
            except OSError as e:
                p.popen = None
                self._failed_start(p, f"could not start: {e.strerror}")
                return
        p.popen, out = taken
        self._pumps[p.key] = Pump(out, self._log(p.spec.name))
        if p.spec.kind == ProcessKind.RUNTIME:
            switch.open_port(self._run, p.spec.name, p.spec.port)
        p.status = Status.STARTING
        p.started_at = time.monotonic()
        if p.spec.load == ON_DEMAND:
            p.loaded_at = time.time()
            demand.mark_loaded(self._run, p.spec.name)
        p.up_since = None
        p.probe_failures = 0
        # A load a request waits for is probed from the start, often; a stack's start, at a pace
        # that leaves the CPUs to the runtimes loading together.
        p.next_probe = p.started_at + (STARTING_TICK if p.spec.load == ON_DEMAND else 0.2)
        # A look at the last start's workers, still running, is of no use to this one.
        p.watch, p.rejoin, p.connected = None, None, set()
        self._event(p.spec.name, f"started pid {p.popen.pid}")

    # -- on demand (see sovctl.runtime.demand) --------------------------------------------------
    def _on_demand_tick(self, now: float) -> None:
        """Load what requests asked for, as memory allows; unload what has been idle too
        long; keep a launch waiting for each model unloaded."""
        for cold in self._on_demand.values():
            if cold.status == Status.UNLOADED and cold.spare is None \
                    and now >= cold.next_spare:
                cold.next_spare = now + SPARE_DELAY
                self._make_spare(cold)
        for name in demand.take_load_requests(self._run):
            asked_for = self._on_demand.get(name)
            if asked_for is not None and asked_for.status == Status.UNLOADED:  # else once
                self._wanted[name] = now
        for name, asked in list(self._wanted.items()):
            p = self._on_demand[name]
            if p.status != Status.UNLOADED or now - asked > WANT_TTL:
                del self._wanted[name]
                p.memory_wait = p.memory_wait_kind = ""
                continue
            if self._make_room(p):
                del self._wanted[name]
                p.memory_wait = p.memory_wait_kind = ""
                self._event(name, "loading: a request asked for it")
                self._start(p)
        for p in self._on_demand.values():
            ttl = p.spec.idle_unload
            if not ttl or p.status != Status.UP or now < p.next_idle:
                continue
            p.next_idle = now + 0.5
            if demand.idle_for(self._run, p.spec.name, p.loaded_at) < ttl:
                continue
            fd = demand.lock_idle(self._run, p.spec.name)
            if fd is None:
                continue  # a request is in flight
            try:
                idle = demand.idle_for(self._run, p.spec.name, p.loaded_at)
                if idle >= ttl:  # no request ended since the look above
                    self._unload(p, f"unloaded after {idle:.0f}s idle")
            finally:
                demand.release(fd)

    def _make_room(self, p: _Proc) -> bool:
        """Whether `p` fits the memory budget now, after unloading idle, unpinned on-demand
        runtimes, least recently used first. None is unloaded unless that makes room: if it
        cannot, `p.memory_wait` says what holds the memory, and whether a request may wait for
        it (runtimes busy with requests, evicted once idle) or not (nothing may evict them)."""
        budget = self.plan.memory
        holders = [q for q in self.procs if q is not p and q.holds_memory()]
        ram = budget.ram - sum(q.spec.memory for q in holders) - p.spec.memory
        vram = budget.vram - sum(q.spec.vram for q in holders) - p.spec.vram
        if ram >= 0 and vram >= 0:
            return True
        # What may ever make way for it: unpinned on-demand runtimes, up (evicted once idle)
        # or loading (evictable once loaded and idle).
        yielding = [q for q in holders if q.spec.load == ON_DEMAND and not q.spec.pin]
        busy: list[_Proc] = [q for q in yielding if q.status != Status.UP]
        if ram + sum(q.spec.memory for q in yielding) < 0 \
                or vram + sum(q.spec.vram for q in yielding) < 0:
            # Held by what nothing may evict: no lock is tried, so no request for an idle
            # model is held off by a look that could not make room anyway.
            return self._no_room(p, holders, busy, MEMORY_HELD)
        evictable = sorted((q for q in yielding if q.status == Status.UP),
                           key=lambda q: -demand.idle_for(self._run, q.spec.name, q.loaded_at))
        locked: list[tuple[_Proc, int]] = []
        for q in evictable:
            if ram >= 0 and vram >= 0:
                break
            fd = demand.lock_idle(self._run, q.spec.name)
            if fd is None:
                busy.append(q)  # requests in flight: never unloaded under them
                continue
            locked.append((q, fd))
            ram += q.spec.memory
            vram += q.spec.vram
        try:
            if ram >= 0 and vram >= 0:
                for q, _ in locked:
                    q.evictions += 1
                    self._unload(q, f"evicted to make room for {p.spec.name}", evicted=True)
                return True
        finally:
            for _, fd in locked:
                demand.release(fd)
        return self._no_room(p, holders, busy, MEMORY_BUSY)

    def _no_room(self, p: _Proc, holders: list[_Proc], busy: list[_Proc], kind: str
                 ) -> bool:
        """Say why `p` cannot load now, naming what holds the memory; False."""
        p.memory_wait_kind = kind
        p.memory_wait = (f"{p.spec.name} needs {_mem(p.spec.memory, p.spec.vram)} and the "
                         f"budget is {memory.describe(self.plan.memory)}; held by "
                         + ", ".join(f"{q.spec.name} {_mem(q.spec.memory, q.spec.vram)} "
                                     f"({self._why_held(q, busy)})" for q in holders))
        return False

    @staticmethod
    def _why_held(q: _Proc, busy: list[_Proc]) -> str:
        if q.spec.load != ON_DEMAND:
            return "loaded always"
        if q.spec.pin:
            return "pinned"
        if q.status != Status.UP:
            return "loading"
        return "requests in flight" if q in busy else "idle"

    def _unload(self, p: _Proc, reason: str, evicted: bool = False) -> None:
        """Stop an idle on-demand runtime, the way a stack stops it, and say so in state.json
        before the gateway may send it another request (the caller holds the lock). One
        evicted is killed outright after its SIGTERM: idle under the lock, it has nothing to
        finish, and a request waits for the memory it holds (llama-server takes 50-130 ms
        to wind down by itself, measured, the kernel a few to take it back)."""
        assert p.popen is not None
        self._event(p.spec.name, reason)
        stop_group(p.popen.pid, 0.0 if evicted else self.cfg.stop_timeout, p.popen)
        p.popen, p.probe = None, None
        p.status, p.up_since, p.last_exit = Status.UNLOADED, None, reason
        p.unload_reason, p.held = reason, (None, None)
        p.unloads += 1
        self._write_state()

    def _ask_workers(self, endpoints: tuple[str, ...]) -> list[cluster.WorkerHealth]:
        timeout = self.cfg.health_timeout
        return [cluster.probe_worker(w, timeout) for w in endpoints]

    def _with_live_workers(self, p: _Proc) -> Argv:
        """A clustered runtime's argv naming only the workers that answer now: llama-server
        aborts on a worker it cannot reach, so a lost worker would crash-loop it. Without
        them it serves the same model, its layers on the head; the reason is recorded, and
        the lost ones are asked again while it runs (see _rejoin)."""
        found = self._ask_workers(p.spec.workers)
        now = time.time()
        p.workers = {h.endpoint: WorkerState(
            h.endpoint, WorkerStatus.IN_USE if h.ok else WorkerStatus.LOST, h.free, h.total,
            0, now, h.reason) for h in found}
        live, lost = [h for h in found if h.ok], [h for h in found if not h.ok]
        if live:
            self._event(p.spec.name, "workers: " + ", ".join(h.describe() for h in live))
        if lost:
            p.last_exit = "degraded: started without worker " + \
                "; ".join(h.describe() for h in lost)
            self._event(p.spec.name, p.last_exit)
        p.next_rejoin = time.monotonic() + REJOIN_INTERVAL
        argv = p.spec.argv
        return Argv(cluster.rpc_argv(argv.args, [h.endpoint for h in live]), argv.env, argv.cwd)

    def _rejoin(self, p: _Proc, now: float) -> None:
        """Ask a degraded runtime's lost workers again; when one answers, restart the runtime
        with it. Requests in flight at that moment fail loudly (5xx), never silently wrong."""
        if p.rejoin is None:
            lost = tuple(w for w, st in p.workers.items() if st.status == WorkerStatus.LOST)
            if lost and now >= p.next_rejoin:
                p.rejoin = self._probes.submit(self._ask_workers, lost)
            return
        if not p.rejoin.done():
            return
        found, p.rejoin = p.rejoin.result(), None
        p.next_rejoin = now + REJOIN_INTERVAL
        wall = time.time()
        for h in found:
            if not h.ok:
                p.workers[h.endpoint] = replace(p.workers[h.endpoint], checked_at=wall,
                                                reason=h.reason)
        back = [h.endpoint for h in found if h.ok]
        if back:
            self._restart_now(p, f"worker {', '.join(back)} answers again: restarted to use it")

    def _watch(self, p: _Proc, now: float) -> None:
        """Notice a worker lost while the runtime is idle. llama-server holds one TCP
        connection to each worker and would find it closed only at its next request, which
        would then fail; the kernel closes it when the worker dies (on a real network, only a
        worker that dies or says so: llama.cpp sets no TCP keepalive), and the runtime is
        restarted without that worker at once. Only a worker it was seen connected to counts:
        a runtime that never connected to one has no connection to lose."""
        assert p.popen is not None
        if p.watch is None:
            in_use = tuple(w for w, st in p.workers.items() if st.status == WorkerStatus.IN_USE)
            if in_use and now >= p.next_watch:
                p.watch = self._probes.submit(cluster.connected_workers, p.popen.pid, in_use)
            return
        if not p.watch.done():
            return
        held, p.watch = p.watch.result(), None
        p.next_watch = now + WATCH_INTERVAL
        if held is None:  # the runtime is gone: its exit is handled as a crash
            return
        gone = sorted(p.connected - held)
        p.connected |= held
        if gone:
            self._restart_now(p, f"worker {', '.join(gone)} lost: the runtime's connection to "
                                 "it closed; restarted without it")

    def _restart_now(self, p: _Proc, reason: str) -> None:
        """Restart a clustered runtime for a change in its workers: no backoff, and no count
        towards a crash loop, since it did not crash. Requests in flight at that moment fail
        loudly (5xx), never silently wrong; new ones wait for it at the gateway."""
        assert p.popen is not None
        self._event(p.spec.name, reason)
        stop_group(p.popen.pid, self.cfg.stop_timeout, p.popen)
        p.popen, p.probe = None, None
        p.restarts += 1
        p.last_exit = reason
        self._start(p)

    def _note_worker_memory(self, p: _Proc) -> None:
        """What the runtime put on each worker, as its load log tells."""
        held = cluster.held_on_workers(self._output(p))
        for endpoint, used in held.items():
            if endpoint in p.workers:
                p.workers[endpoint] = replace(p.workers[endpoint], holds=used)

    def _failed_start(self, p: _Proc, reason: str) -> None:
        p.last_exit = reason
        self._schedule_restart(p, reason)

    def _tick(self, p: _Proc, now: float, interval: float) -> None:
        if p.status in (Status.FAILED, Status.STOPPED, Status.UNLOADED):
            return
        if p.status == Status.BACKOFF:
            if now >= p.next_start:
                self._start(p)
            return
        assert p.popen is not None
        code = p.popen.poll()
        if code is not None:
            reason = f"exited with code {code}" if code >= 0 else f"killed by signal {-code}"
            self._crashed(p, reason)
            return
        if p.status == Status.STARTING and now - p.started_at > self.cfg.start_timeout:
            self._crashed(p, f"not healthy within {self.cfg.start_timeout}s")
            return
        if p.probe is not None and p.probe.done():
            result = p.probe.result()
            p.probe = None
            if result == Probe.FOREIGN:
                holder = listener(p.spec.port)
                self._crashed(p, f"port {p.spec.port} is held by another process"
                                 + (f": {holder}" if holder else ""))
                return
            if result == Probe.OK:
                if p.status != Status.UP:
                    p.status = Status.UP
                    p.up_since = time.time()
                    p.loads += 1
                    p.load_seconds += now - p.started_at
                    self._event(p.spec.name, "healthy")
                    if p.workers:
                        self._note_worker_memory(p)
                p.probe_failures = 0
            elif p.spec.kind == ProcessKind.TUNNEL and self._probe_refused(p):
                p.next_probe = now  # its health is the remote forward's from now on: look now
            elif p.status == Status.UP:
                p.probe_failures += 1
                if p.probe_failures >= self.cfg.health_failures:
                    self._crashed(p, f"hung: {p.probe_failures} health checks failed")
                    return
        if p.workers and p.status == Status.UP:
            self._watch(p, now)
            if p.popen is not None and p.status == Status.UP:
                self._rejoin(p, now)
            if p.popen is None or p.status != Status.UP:
                return
        if p.probe is None and now >= p.next_probe:
            url = f"http://127.0.0.1:{p.spec.port}{p.spec.health_path}"
            p.probe = self._probes.submit(_probe_listening, p.popen.pid, p.spec.port) \
                if p.spec.kind == ProcessKind.WORKER else \
                self._probes.submit(self._forward_held, p) if p.unprobed else \
                self._probes.submit(_probe, url, self.cfg.health_timeout, p.popen.pid)
            p.next_probe = now + (interval if p.status == Status.UP else
                                  STARTING_TICK if p.spec.load == ON_DEMAND else 0.25)

    def _probe_refused(self, p: _Proc) -> bool:
        """Whether a tunnel's probe failed because its public host refuses the probe's way in
        (a hardened sshd: AllowTcpForwarding remote). Its health then rests, for the rest of
        this supervisor's life, on the host's confirmation of the remote forward: ssh exits
        when that forward is refused or lost (ExitOnForwardFailure, keepalives)."""
        if p.unprobed or self.plan.tunnel is None:
            return False
        why = probe_refused(self.plan.tunnel, self._output(p))
        if why is None:
            return False
        p.unprobed = why
        self._event(p.spec.name, f"end-to-end probe skipped: {why}")
        return True

    def _forward_held(self, p: _Proc) -> Probe:
        assert self.plan.tunnel is not None
        return Probe.OK if forward_confirmed(self.plan.tunnel, self._output(p)) else Probe.FAILED

    def _crashed(self, p: _Proc, reason: str) -> None:
        if p.popen is not None:
            # A crashed or hung process gets a short grace: SIGKILL also ends a stopped one.
            stop_group(p.popen.pid, timeout=1.0, proc=p.popen)
        p.popen = None
        p.probe = None
        fatal = False
        if p.spec.kind == ProcessKind.TUNNEL and self.plan.tunnel is not None:
            # ssh says why in its log; a refusal no retry can cure (a changed host key, a
            # rejected login) stops the tunnel at once rather than knocking again forever.
            failure = diagnose(self.plan.tunnel, self._output(p))
            if failure is not None:
                reason, fatal = f"{reason}: {failure.message}", failure.fatal
        p.last_exit = reason
        self._event(p.spec.name, reason)
        if fatal:
            p.status = Status.FAILED
            self._event(p.spec.name, "marked failed: a retry cannot succeed until the operator "
                                     "acts (see 'sovctl logs tunnel')")
            return
        self._schedule_restart(p, reason)

    def _output(self, p: _Proc) -> str:
        """What the process wrote since its last start (the first logfiles.HEAD_BYTES)."""
        pump = self._pumps.get(p.key)
        if pump is None:
            return ""
        if p.popen is None:
            pump.drain(timeout=2.0)  # it has exited: what it wrote last is read first
        return pump.head()

    def _schedule_restart(self, p: _Proc, reason: str) -> None:
        now = time.monotonic()
        window = self.cfg.restart_window
        while p.recent and now - p.recent[0] > window:
            p.recent.popleft()
        # A tunnel fails with its network or its far host, which come back by themselves: it
        # keeps retrying at the longest backoff instead of being given up on as crash-looping.
        if p.spec.kind != ProcessKind.TUNNEL and len(p.recent) >= self.cfg.max_restarts:
            p.status = Status.FAILED
            self._event(p.spec.name, f"marked failed: {len(p.recent) + 1} failures within "
                                     f"{window:.0f}s, last: {reason}")
            return
        p.recent.append(now)
        p.restarts += 1
        delay = min(0.5 * 2 ** (len(p.recent) - 1), 30.0)
        p.status = Status.BACKOFF
        p.next_start = now + delay
        self._event(p.spec.name, f"restart {p.restarts} in {delay:.1f}s")

    def _stop_all(self) -> None:
        # A switch under way ends with the stack: a new runtime still starting is given up; an
        # old one still finishing its requests is stopped with the rest.
        draining = [sw.old for sw in self._switching.values() if sw.phase == "draining"]
        for sw in list(self._switching.values()):
            if sw.phase == "draining":
                self._end_switch(sw, "done", "")
            else:
                self._end_switch(sw, "failed", "the stack stopped during the switch")
        for p in self.procs:
            self._drop_spare(p)
        live = [p for p in [*self.procs, *draining] if p.popen is not None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.cfg.stop_timeout
        for p in live:
            assert p.popen is not None
            stop_group(p.popen.pid, max(deadline - time.monotonic(), 0.1), p.popen)
            p.popen = None
        for p in self.procs:
            if p.status != Status.FAILED:
                p.status = Status.STOPPED
        self._event("supervisor", "stopped all processes")

    # -- switching a model to other weights (see sovctl.runtime.switch) ------------------------
    def _switch_tick(self, now: float, interval: float) -> None:
        if now >= self._next_switch_look:
            self._next_switch_look = now + 0.1
            for request in switch.take_requests(self._run):
                if isinstance(request, str):
                    self._event("supervisor", f"switch request {request!r} is malformed; "
                                              "ignored")
                else:
                    self._begin_switch(request)
        for sw in list(self._switching.values()):
            if sw.phase == "starting":
                self._starting(sw, now, interval)
            else:
                self._draining(sw)

    def _refuse_switch(self, request: switch.SwitchRequest, from_sha256: str, why: str) -> None:
        now = time.time()
        self._event(request.name, f"switch to sha256 {request.sha256[:12]} refused: {why}")
        self._switched[request.name] = SwitchState(
            request.id, request.name, request.why, from_sha256, request.sha256, "failed", now,
            now, reason=why)
        self._write_state()

    def _begin_switch(self, request: switch.SwitchRequest) -> None:
        name = request.name
        p = next((q for q in self.procs
                  if q.spec.kind == ProcessKind.RUNTIME and q.spec.name == name), None)
        if p is None:
            self._refuse_switch(request, "", f"this stack serves no model named {name!r}")
            return
        if name in self._switching:
            self._refuse_switch(request, p.spec.sha256, "another switch of it is under way")
            return
        model = next(m for m in self.plan.models if m.name == p.spec.model)
        try:
            need = memory.need(Path(request.blob), name, model.n_ctx, model.parallel,
                               model.n_gpu_layers, self._gpus, model.mmproj_size)
        except (SovctlError, OSError, ValueError) as e:  # a blob it cannot read or size
            self._refuse_switch(request, p.spec.sha256, f"cannot read {request.blob}: {e}")
            return
        spec = replace(p.spec, sha256=request.sha256, memory=need.ram, vram=need.vram)
        if p.status == Status.UNLOADED:
            # Nothing runs: the next request loads the new weights.
            p.spec = replace(spec, argv=_switched_argv(p.spec.argv, request.blob, p.spec.port))
            self._served(p, request)
            self._finish(request, p.spec.sha256, "done", time.time(), "")
            return
        port = free_port()
        sw = _Switch(request, p, _Proc(replace(spec, argv=_switched_argv(
            p.spec.argv, request.blob, port), port=port), tag="~next"), p.spec.sha256,
            time.time(), old_port=p.spec.port)
        if not self._make_room(sw.new):
            self._refuse_switch(request, p.spec.sha256, "no memory to run the new weights "
                                "beside the old ones: " + sw.new.memory_wait)
            return
        self._switching[name] = sw
        self._event(name, f"switching to sha256 {request.sha256[:12]} ({request.why}): "
                          f"starting it on port {port} beside the runtime serving it")
        self._start(sw.new)

    def _starting(self, sw: _Switch, now: float, interval: float) -> None:
        new = sw.new
        self._tick(new, now, interval)
        if new.status in (Status.BACKOFF, Status.FAILED):
            # A new runtime that does not come up is given up at once: the old one serves on.
            self._end_switch(sw, "failed", f"the new runtime did not start: {new.last_exit}")
        elif new.status == Status.UP:
            self._cut_over(sw)

    def _cut_over(self, sw: _Switch) -> None:
        """The new runtime answers: it takes the model's requests from the next state.json
        on. The old one's port is retired once its requests in flight end (`_draining`)."""
        old, new = sw.old, sw.new
        name = old.spec.name
        new.restarts += old.restarts
        new.loads += old.loads
        new.load_seconds += old.load_seconds
        new.unloads, new.evictions = old.unloads, old.evictions
        self.procs[self.procs.index(old)] = new
        if name in self._on_demand:
            self._on_demand[name] = new
        old_pump, new_pump = self._pumps.pop(old.key, None), self._pumps.pop(new.key)
        old.tag, new.tag = "~old", ""
        self._pumps[new.key] = new_pump
        if old_pump is not None:
            self._pumps[old.key] = old_pump
        self._served(new, sw.request)
        sw.phase, sw.served_at = "draining", time.monotonic()
        self._event(name, f"now served by sha256 {new.spec.sha256[:12]} on port "
                          f"{new.spec.port}; the old runtime finishes its requests in flight")
        self._write_state()

    def _draining(self, sw: _Switch) -> None:
        cut = ""
        if not switch.retire_port(self._run, sw.old.spec.name, sw.old_port):
            # A request is in flight on the old runtime: waited for, up to drain_timeout (a
            # stream that never ends would keep the old weights in memory for ever).
            if time.monotonic() - sw.served_at < self.cfg.drain_timeout:
                return
            cut = (f"the old runtime still had requests in flight after drain_timeout "
                   f"({self.cfg.drain_timeout:.0f}s): stopped under them")
            self._event(sw.old.spec.name, cut)
        if sw.old.popen is not None:
            stop_group(sw.old.popen.pid, self.cfg.stop_timeout, sw.old.popen)
            sw.old.popen = None
        if cut:
            switch.retire_port(self._run, sw.old.spec.name, sw.old_port)
        self._pumps.pop(sw.old.key, None)
        self._end_switch(sw, "done", cut)

    def _end_switch(self, sw: _Switch, phase: str, reason: str) -> None:
        name = sw.old.spec.name
        del self._switching[name]
        if phase == "failed" and sw.phase == "starting":
            if sw.new.popen is not None:
                stop_group(sw.new.popen.pid, self.cfg.stop_timeout, sw.new.popen)
                sw.new.popen = None
            self._pumps.pop(sw.new.key, None)
            switch.retire_port(self._run, name, sw.new.spec.port)
        drained = time.monotonic() - sw.served_at if sw.served_at else 0.0
        self._finish(sw.request, sw.from_sha256, phase, sw.started_at, reason,
                     old_port=sw.old_port, new_port=sw.new.spec.port, drained=drained)

    def _finish(self, request: switch.SwitchRequest, from_sha256: str, phase: str,
                started_at: float, reason: str, old_port: int = 0, new_port: int = 0,
                drained: float = 0.0) -> None:
        self._event(request.name, f"switch to sha256 {request.sha256[:12]} {phase}"
                                  + (f": {reason}" if reason else ""))
        self._switched[request.name] = SwitchState(
            request.id, request.name, request.why, from_sha256, request.sha256, phase,
            started_at, time.time(), reason, old_port=old_port, new_port=new_port,
            drain_seconds=round(drained, 3))
        self._write_state()

    def _served(self, p: _Proc, request: switch.SwitchRequest) -> None:
        """The plan says what is served now: a detached supervisor's plan.json too, which a
        restart of the stack with its public face (sovctl tunnel) reads."""
        old = next(s for s in self.plan.processes if s.name == p.spec.name)
        self.plan = replace(
            self.plan,
            processes=tuple(p.spec if s is old else s for s in self.plan.processes),
            models=tuple(replace(m, sha256=request.sha256, size=request.size,
                                 blob=request.blob) if m.name == p.spec.model else m
                         for m in self.plan.models))
        saved = self._run / "plan.json"
        if saved.exists():
            atomic_write(saved, self.plan.to_json().encode())

    def _switch_state(self, name: str) -> SwitchState:
        sw = self._switching.get(name)
        if sw is None:
            return self._switched[name]
        old = sw.old if sw.old.popen is not None else None
        new = sw.new if sw.phase == "starting" and sw.new.popen is not None else None
        return SwitchState(sw.request.id, name, sw.request.why, sw.from_sha256,
                           sw.request.sha256, sw.phase, sw.started_at,
                           old_pid=old.popen.pid if old and old.popen else None,
                           old_port=sw.old_port,
                           new_pid=new.popen.pid if new and new.popen else None,
                           new_port=sw.new.spec.port)

    # -- state ----------------------------------------------------------------------------------
    def state(self, final: bool = False) -> StackState:
        runtimes = [p for p in self.procs if p.spec.kind == ProcessKind.RUNTIME]
        busy = demand.in_flight(self._run, [p.spec.name for p in runtimes])
        vram = memory.gpu_use() if self._gpus else None
        for p in runtimes:
            p.held = memory.held(p.popen.pid, vram) if p.popen else (None, None)
        return StackState(
            supervisor_pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            url=self.plan.url,
            host=self.plan.host,
            port=self.plan.port,
            api_key_required=self.plan.api_key_required,
            stopping=self.stopping,
            final=final,
            processes=tuple(
                self._memory_state(p, p.spec.name in busy, ProcessState(
                    name=p.spec.name, kind=p.spec.kind, role=p.spec.role, model=p.spec.model,
                    sha256=p.spec.sha256, runtime=p.spec.runtime, port=p.spec.port,
                    pid=p.popen.pid if p.popen else None, status=p.status,
                    restarts=p.restarts, up_since=p.up_since, last_exit=p.last_exit,
                    workers=tuple(p.workers.values()), probe_skipped=p.unprobed,
                ))
                for p in self.procs
            ),
            events=tuple(self.events),
            switches=tuple(self._switch_state(n) for n in sorted({*self._switched,
                                                                  *self._switching})),
            memory=self.plan.memory,
        )

    def _memory_state(self, p: _Proc, busy: bool, st: ProcessState) -> ProcessState:
        """A runtime's state with its memory, load state and load counters."""
        if p.spec.kind != ProcessKind.RUNTIME:
            return st
        if p.status == Status.UP:
            load_state = LoadState.LOADED if busy else LoadState.IDLE
        elif p.status in (Status.STARTING, Status.BACKOFF, Status.PENDING):
            load_state = LoadState.LOADING
        else:
            load_state = LoadState.UNLOADED
        last = None
        if p.spec.load == ON_DEMAND and p.loaded_at:
            last = time.time() if busy else \
                time.time() - demand.idle_for(self._run, p.spec.name, p.loaded_at)
        return replace(st, load=p.spec.load, pinned=p.spec.pin, load_state=str(load_state),
                       last_used=last, memory_estimated=p.spec.memory,
                       vram_estimated=p.spec.vram, memory_held=p.held[0], vram_held=p.held[1],
                       unload_reason=p.unload_reason, memory_wait=p.memory_wait,
                       memory_wait_kind=p.memory_wait_kind, loads=p.loads,
                       load_seconds=round(p.load_seconds, 3), unloads=p.unloads,
                       evictions=p.evictions)

    def _state_changed(self) -> bool:
        keyed: list[object] = [sw.phase for sw in self._switching.values()]
        keyed += [(p.status, p.restarts, p.popen.pid if p.popen else None, p.memory_wait_kind)
                 for p in self.procs]
        changed = keyed != self._last_keyed
        self._last_keyed = keyed
        return changed

    def _write_state(self, final: bool = False) -> None:
        st = self.state(final)
        st.write(Path(self.plan.state_file))
        if self.on_change:
            self.on_change(st)


def run_plan(plan: Plan, on_change: Callable[[StackState], None] | None = None) -> None:
    """Run `plan` in this process until SIGTERM/SIGINT. The caller holds the instance lock."""
    sup = Supervisor(plan, on_change)
    old_term = signal.signal(signal.SIGTERM, sup.request_stop)
    old_int = signal.signal(signal.SIGINT, sup.request_stop)
    old_hup = signal.signal(signal.SIGHUP, sup.request_stop)
    try:
        sup.run()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGHUP, old_hup)


def main(argv: list[str]) -> None:
    plan = Plan.from_json(Path(argv[0]).read_text(), argv[0])
    fd = acquire_instance_lock(Path(plan.state_file).parent)
    try:
        run_plan(plan)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1:])
