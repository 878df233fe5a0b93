"""`sovctl doctor`: this machine checked for a stack, each finding with its fix.

The facts come from `sovctl.provision.facts`; the checks add what else a stack needs: the
llama.cpp build, namespaces (the blackout audit's own preflight, `sovctl.netns`), whether this
box can be an RPC worker, the gateway's port (`sovctl.runtime.ports`), the lock
(`sovctl.store.integrity`), and the profile `init` would pick (`sovctl.provision.profiles`).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sovctl import config, engines
from sovctl.errors import BusyError, ConfigError, IsolationError, UsageError
from sovctl.home import Home
from sovctl.llamacpp import SETUP_HINT, find_binary
from sovctl.netns import preflight
from sovctl.provision.facts import HostFacts, detect
from sovctl.provision.profiles import choose
from sovctl.runtime import cluster, control
from sovctl.runtime.documents import ProcessKind, StackState
from sovctl.runtime.ports import ensure_free, listener
from sovctl.runtime.supervisor import instance_running
from sovctl.store.integrity import check
from sovctl.store.lock import Lock
from sovctl.units import GiB

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | info
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorReport:
    facts: HostFacts
    checks: tuple[Check, ...]
    profile: str | None  # the profile `sovctl init` would pick
    profile_reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == FAIL)


SETUP = "./scripts/setup in the sovctl checkout"


def _check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", OK if ok else FAIL, platform.python_version() + " (3.11 or newer "
                 "needed)", None if ok else "install Python 3.11 or newer and rerun " + SETUP)


def _check_llama(f: HostFacts, runtime: str) -> list[Check]:
    ll = f.llama
    out = []
    if ll.llama_cpp_python is None:
        out.append(Check(engines.DISTRIBUTION, FAIL, "not installed",
                         "run " + SETUP + " (it builds llama.cpp once)"))
    elif ll.import_error:
        out.append(Check(engines.DISTRIBUTION, FAIL, f"{ll.llama_cpp_python} does not load: "
                         f"{ll.import_error}", "rebuild it: run " + SETUP))
    else:
        build = (f"llama.cpp {ll.commit}, {'CUDA' if ll.cuda_build else 'CPU-only'} build"
                 if ll.commit else "not built by scripts/setup (build unknown)")
        out.append(Check(engines.DISTRIBUTION, OK, f"{ll.llama_cpp_python}; {build}"))
    native = engines.PREFERRED
    if ll.llama_server:
        out.append(Check(native.binary, OK, ll.llama_server))
    else:
        needed = runtime in engines.ENGINES and bool(engines.ENGINES[runtime].binary)
        fallback = engines.FALLBACK.name
        out.append(Check(
            native.binary, FAIL if needed else WARN,
            "not found" + (f"; [serve] runtime = \"{runtime}\" needs it" if needed else
                           f"; serve falls back to {fallback}, one request at a time"),
            SETUP_HINT))
    return out


def _check_gpu(f: HostFacts) -> Check:
    if not f.gpus:
        return Check("gpu", INFO, "no NVIDIA GPU visible through NVML"
                     + ("" if f.nvml else " (no NVML library or driver)") + ": CPU profiles")
    names = "; ".join(f"GPU {g.index} {g.name}, {g.memory_total / GiB:.1f} GiB "
                      f"({g.memory_free / GiB:.1f} free)" for g in f.gpus)
    detail = f"{names}; driver {f.driver_version}, CUDA {f.cuda_version or '?'}"
    if f.llama.gpu_offload:
        return Check("gpu", OK, detail + "; this llama.cpp build offloads to it")
    return Check("gpu", WARN, detail + "; but this llama.cpp build cannot offload to it "
                 + ("(a CPU-only build)" if f.llama.cuda_build is False else ""),
                 "install the CUDA toolkit (nvcc on PATH) and rerun " + SETUP
                 + ": it rebuilds llama.cpp with CUDA")


def _check_memory(f: HostFacts) -> list[Check]:
    ram = Check("ram", OK if f.ram_total >= 4 * GiB else WARN,
                f"{f.ram_total / GiB:.1f} GiB, {f.ram_available / GiB:.1f} GiB available",
                None if f.ram_total >= 4 * GiB else "the smallest profile wants 4 GiB; close "
                "other programs, or plan a small model: sovctl plan NAME")
    if f.disk_free < GiB:
        status, fix = FAIL, f"free space under {f.disk_path}, or move the home (--home PATH)"
    elif f.disk_free < 10 * GiB:
        status, fix = WARN, "models take 1-50 GB each: free space or move the home (--home)"
    else:
        status, fix = OK, None
    disk = Check("disk", status, f"{f.disk_free / GiB:.1f} GiB free under {f.disk_path}", fix)
    return [ram, disk]


def _check_namespaces() -> Check:
    try:
        mode = preflight()
    except IsolationError as e:
        return Check("namespaces", WARN, "cannot create a network namespace, so 'sovctl audit "
                     "blackout' cannot run: " + e.message.split(": ", 1)[-1], e.hint)
    return Check("namespaces", OK, f"a network namespace can be created ({mode}) for "
                 "'sovctl audit blackout'")


def _check_port(home: Home, host: str, port: int) -> Check:
    try:
        ensure_free(host, port, "the gateway")
        return Check(f"port {port}", OK, f"free on {host} for the gateway")
    except BusyError as e:
        st = control.status(home)
        holder = listener(port)
        ours = {p.pid for p in st.processes if p.pid} | {st.supervisor_pid}
        if st.running and (holder is None or holder.pid in ours):
            return Check(f"port {port}", OK, "held by this home's running stack")
        return Check(f"port {port}", FAIL, e.message, e.hint)


def _check_lock(home: Home) -> Check:
    try:
        lock = Lock.load(home)
    except ConfigError as err:
        return Check("lock", FAIL, err.message, err.hint)
    if not lock.entries:
        return Check("lock", INFO, "no models pinned yet: sovctl up (or sovctl pull REF)")
    bad = []
    for entry in lock.entries.values():
        blobs = [(entry.name, entry.sha256, entry.size)]
        projector: Any = getattr(entry, "mmproj", None)  # a vision model's projector
        if projector is not None:
            blobs.append((entry.name + "/mmproj", projector.sha256, projector.size))
        for label, sha, size in blobs:
            r = check(home, label, sha, size, full=False)
            if not r.ok:
                bad.append(f"{label} {r.status}")
    if bad:
        return Check("lock", FAIL, f"{len(bad)} blob(s) do not match sovctl.lock: "
                     f"{', '.join(bad)}", "sovctl verify NAME; then sovctl rm NAME and pull it "
                     "again")
    return Check("lock", OK, f"{len(lock.entries)} model(s) match sovctl.lock (quick check: "
                 "a full hash where the blob changed since its last one)")


def _check_cluster(home: Home) -> list[Check]:
    """Whether this box can be an RPC worker, and whether this home's worker is exposed: its
    protocol is unauthenticated, so one reachable beyond a private network is a finding."""
    binary = find_binary(cluster.RPC_WORKER)
    out = [Check("rpc", OK, f"{binary} (sovctl worker)") if binary else
           Check("rpc", INFO, "no ggml-rpc-server: this box cannot be a worker", SETUP_HINT)]
    st = StackState.read(home.run / "state.json")
    if st is not None and instance_running(home.run) and any(
            p.kind == ProcessKind.WORKER for p in st.processes):
        try:
            out.append(Check("worker", OK, f"listens on {st.host}:{st.port} "
                             f"({cluster.bind_scope(st.host)})"))
        except UsageError:
            out.append(Check("worker", FAIL, f"the RPC worker listens on {st.host}:{st.port}, "
                             "beyond a private network, and RPC is unauthenticated",
                             "restart it on a loopback, private or WireGuard address: "
                             "sovctl stop && sovctl worker --host ADDR --detach"))
    return out


def doctor(home: Home, environ: Mapping[str, str] | None = None) -> DoctorReport:
    checks: list[Check] = [_check_python()]
    cfg = None
    try:
        cfg = config.load(home, environ=environ)
        checks.append(Check("config", OK, (f"{home.config_path}" if home.config_path.exists()
                                           else "no sovctl.toml yet (sovctl init writes one)")
                            + (f"; profile {cfg.profile}" if cfg.profile else "")))
    except ConfigError as e:
        checks.append(Check("config", FAIL, e.message, e.hint))
    setting = cfg.serve.llama_server if cfg else ""
    facts = detect(home, setting)
    checks += _check_llama(facts, cfg.serve.runtime if cfg else engines.AUTO)
    checks.append(_check_gpu(facts))
    checks += _check_memory(facts)
    checks.append(_check_namespaces())
    checks += _check_cluster(home)
    if cfg is not None:
        checks.append(_check_port(home, cfg.serve.host, cfg.serve.port))
    checks.append(_check_lock(home))
    try:
        chosen = choose(home, facts, environ)
        profile, reasons = chosen.profile.name, chosen.reasons
    except ConfigError as e:
        profile, reasons = None, (e.message,)
    return DoctorReport(facts, tuple(checks), profile, tuple(reasons))
