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

from sovctl.errors import BusyError
from sovctl.runtime import cluster, demand
from sovctl.runtime.documents import (
    Event,
    ProcessKind,
    ProcessState,
    StackState,
    Status,
    WorkerState,
    WorkerStatus,
)
from sovctl.runtime.logfiles import Pump, RotatingLog
from sovctl.runtime.plan import ON_DEMAND, Plan, inherited_env, provider_keys
from sovctl.runtime.ports import listener, owned_by
from sovctl.runtime.procs import Argv, ProcessSpec, spawn, stop_group
from sovctl.runtime.tunnel import diagnose, forward_confirmed, probe_refused


@dataclass
class _Proc:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes] | None = None
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


# How often a clustered runtime running without some of its workers asks them again.
REJOIN_INTERVAL = 10.0
# How often a clustered runtime's connections to its workers are looked at (see _watch).
WATCH_INTERVAL = 2.0


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
        self._last_keyed: list[tuple[Status, int, int | None]] = []
        self._run = Path(plan.state_file).parent
        self._on_demand = {p.spec.name: p for p in self.procs if p.spec.load == ON_DEMAND}

    # -- lifecycle ----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> None:
        if self._on_demand:
            demand.prepare(self._run)
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
                for p in self.procs:
                    self._tick(p, now, interval)
                if now >= next_state or self._state_changed():
                    self._write_state()
                    next_state = now + interval
                time.sleep(0.05)
        finally:
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

    def _start(self, p: _Proc) -> None:
        argv = self._with_live_workers(p) if p.spec.workers else p.spec.argv
        env = {**argv.env, "SOVCTL_SUPERVISOR_PID": str(os.getpid())}
        # The child writes into a pipe that the supervisor reads into its log (see logfiles):
        # so the log can be rotated while the child runs.
        out, into = os.pipe()
        try:
            p.popen = spawn(Argv(argv.args, env, argv.cwd), out=into,
                            base_env=inherited_env(p.spec, self._provider_keys))
        except OSError as e:
            os.close(out)
            p.popen = None
            self._failed_start(p, f"could not start: {e.strerror}")
            return
        finally:
            os.close(into)
        self._pumps[p.spec.name] = Pump(out, self._log(p.spec.name))
        p.status = Status.STARTING
        p.started_at = time.monotonic()
        if p.spec.load == ON_DEMAND:
            p.loaded_at = time.time()
            demand.mark_loaded(self._run, p.spec.name)
        p.up_since = None
        p.probe_failures = 0
        p.next_probe = p.started_at + 0.2
        # A look at the last start's workers, still running, is of no use to this one.
        p.watch, p.rejoin, p.connected = None, None, set()
        self._event(p.spec.name, f"started pid {p.popen.pid}")

    # -- on demand (see sovctl.runtime.demand) --------------------------------------------------
    def _on_demand_tick(self, now: float) -> None:
        """Load what requests asked for; unload what has been idle too long."""
        for name in demand.take_load_requests(self._run):
            p = self._on_demand.get(name)
            if p is not None and p.status == Status.UNLOADED:  # else loaded already: once
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
                    self._unload(p, idle)
            finally:
                demand.release(fd)

    def _unload(self, p: _Proc, idle: float) -> None:
        """Stop an idle on-demand runtime, the way a stack stops it, and say so in state.json
        before the gateway may send it another request (the caller holds the lock)."""
        assert p.popen is not None
        reason = f"unloaded after {idle:.0f}s idle"
        self._event(p.spec.name, reason)
        stop_group(p.popen.pid, self.cfg.stop_timeout, p.popen)
        p.popen, p.probe = None, None
        p.status, p.up_since, p.last_exit = Status.UNLOADED, None, reason
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
            p.next_probe = now + (interval if p.status == Status.UP else 0.25)

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
        pump = self._pumps.get(p.spec.name)
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
        live = [p for p in self.procs if p.popen is not None]
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

    # -- state ----------------------------------------------------------------------------------
    def state(self, final: bool = False) -> StackState:
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
                ProcessState(
                    name=p.spec.name, kind=p.spec.kind, role=p.spec.role, model=p.spec.model,
                    sha256=p.spec.sha256, runtime=p.spec.runtime, port=p.spec.port,
                    pid=p.popen.pid if p.popen else None, status=p.status,
                    restarts=p.restarts, up_since=p.up_since, last_exit=p.last_exit,
                    workers=tuple(p.workers.values()), probe_skipped=p.unprobed,
                )
                for p in self.procs
            ),
            events=tuple(self.events),
        )

    def _state_changed(self) -> bool:
        keyed = [(p.status, p.restarts, p.popen.pid if p.popen else None) for p in self.procs]
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
