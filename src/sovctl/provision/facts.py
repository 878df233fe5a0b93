"""What this machine is (`sovctl doctor`, and the facts `init`, `plan` and `up` decide from).

Each fact has one source elsewhere in sovctl, used here rather than measured again: the CPU
from `sovctl.hostinfo`, GPUs from the NVML wrapper of `sovctl.bench.telemetry`, whether this
llama.cpp build can offload from `sovctl.bench.fingerprint.gpu_offload`, the build itself from
`sovctl.runtime.llamacpp`, namespaces from the blackout audit's own preflight, ports from
`sovctl.runtime.ports`, and the lock from `sovctl.store.integrity`.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.home import Home


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total: int
    memory_free: int


@dataclass(frozen=True)
class LlamaFacts:
    llama_cpp_python: str | None  # the installed version; None when it is not installed
    import_error: str | None  # why llama_cpp could not be loaded, when it could not
    commit: str | None  # of the llama.cpp build scripts/setup recorded
    build_flags: str
    cuda_build: bool | None  # the build was compiled with CUDA (None: unknown)
    gpu_offload: bool  # llama.cpp sees a local GPU it can offload layers to
    llama_server: str | None  # the binary serve would run


@dataclass(frozen=True)
class HostFacts:
    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total: int
    ram_available: int
    os: str
    python: str
    disk_path: str  # the home, or the nearest existing folder above it
    disk_free: int
    disk_total: int
    nvml: bool  # an NVML library and driver answered
    driver_version: str | None
    cuda_version: str | None  # the newest CUDA the driver supports
    gpus: tuple[Gpu, ...]
    llama: LlamaFacts

    @property
    def usable_gpus(self) -> tuple[Gpu, ...]:
        """GPUs this llama.cpp build can put layers on."""
        return self.gpus if self.llama.gpu_offload else ()

    @property
    def largest_gpu(self) -> Gpu | None:
        return max(self.usable_gpus, key=lambda g: g.memory_total, default=None)

    @property
    def vram_note(self) -> str:
        """Why there is no VRAM to plan with, or where it comes from."""
        if not self.gpus:
            return "no NVIDIA GPU visible through NVML"
        if not self.llama.gpu_offload:
            return "this llama.cpp build cannot offload to the GPU"
        return f"free on {len(self.gpus)} GPU(s), NVML"


def _existing(path: Path) -> Path:
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def gpus() -> tuple[bool, str | None, str | None, tuple[Gpu, ...]]:
    """(NVML answered, driver, CUDA version, GPUs) through sovctl's one NVML session."""
    from sovctl.bench.telemetry import open_nvml

    session = open_nvml()
    if session is None:
        return False, None, None, ()
    try:
        info = session.info()
        free = {i: int(session.nv.nvmlDeviceGetMemoryInfo(h).free) for i, h in session.handles}
        return True, info.driver_version, info.cuda_version or None, tuple(
            Gpu(g.index, g.name, g.memory_total_bytes, free.get(g.index, g.memory_total_bytes))
            for g in info.gpus)
    finally:
        session.close()


def llama_facts(llama_server_setting: str = "") -> LlamaFacts:
    from importlib import metadata

    from sovctl.errors import ConfigError
    from sovctl.runtime.llamacpp import LLAMA_SERVER, build_info, find_binary

    try:
        version: str | None = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = None
    build = build_info()
    offload, error = False, None
    if version is not None:
        try:
            from sovctl.bench.fingerprint import gpu_offload

            offload = gpu_offload()
        except (ImportError, OSError, AttributeError) as e:
            error = f"{type(e).__name__}: {e}"
    try:
        server = find_binary(LLAMA_SERVER, llama_server_setting)
    except ConfigError:
        server = None
    flags = build.flags if build else ""
    return LlamaFacts(
        llama_cpp_python=version, import_error=error,
        commit=build.commit if build else None, build_flags=flags,
        cuda_build=("GGML_CUDA=ON" in flags) if build else None,
        gpu_offload=offload, llama_server=str(server) if server else None,
    )


def detect(home: Home, llama_server_setting: str = "") -> HostFacts:
    import psutil

    from sovctl.hostinfo import cpu_model, physical_cores

    vm = psutil.virtual_memory()
    disk = _existing(home.root)
    usage = shutil.disk_usage(disk)
    nvml, driver, cuda, found = gpus()
    return HostFacts(
        cpu_model=cpu_model(), physical_cores=physical_cores(),
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_total=int(vm.total), ram_available=int(vm.available),
        os=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=platform.python_version(), disk_path=str(disk), disk_free=int(usage.free),
        disk_total=int(usage.total), nvml=nvml, driver_version=driver, cuda_version=cuda,
        gpus=found, llama=llama_facts(llama_server_setting),
    )


# -- the checks of `sovctl doctor` -----------------------------------------------------------------
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


GiB = 1 << 30
SETUP = "./scripts/setup in the sovctl checkout"


def _check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", OK if ok else FAIL, platform.python_version() + " (3.11 or newer "
                 "needed)", None if ok else "install Python 3.11 or newer and rerun " + SETUP)


def _check_llama(f: HostFacts, runtime: str) -> list[Check]:
    from sovctl.runtime.llamacpp import SETUP_HINT

    ll = f.llama
    out = []
    if ll.llama_cpp_python is None:
        out.append(Check("llama-cpp-python", FAIL, "not installed",
                         "run " + SETUP + " (it builds llama.cpp once)"))
    elif ll.import_error:
        out.append(Check("llama-cpp-python", FAIL, f"{ll.llama_cpp_python} does not load: "
                         f"{ll.import_error}", "rebuild it: run " + SETUP))
    else:
        build = (f"llama.cpp {ll.commit}, {'CUDA' if ll.cuda_build else 'CPU-only'} build"
                 if ll.commit else "not built by scripts/setup (build unknown)")
        out.append(Check("llama-cpp-python", OK, f"{ll.llama_cpp_python}; {build}"))
    if ll.llama_server:
        out.append(Check("llama-server", OK, ll.llama_server))
    else:
        needed = runtime == "llama-server"
        out.append(Check(
            "llama-server", FAIL if needed else WARN,
            "not found" + ("; [serve] runtime = \"llama-server\" needs it" if needed else
                           "; serve falls back to llama-cpp-python, one request at a time"),
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
    from sovctl.audit.isolation import preflight
    from sovctl.errors import IsolationError

    try:
        mode = preflight()
    except IsolationError as e:
        return Check("namespaces", WARN, "cannot create a network namespace, so 'sovctl audit "
                     "blackout' cannot run: " + e.message.split(": ", 1)[-1], e.hint)
    return Check("namespaces", OK, f"a network namespace can be created ({mode}) for "
                 "'sovctl audit blackout'")


def _check_port(home: Home, host: str, port: int) -> Check:
    from sovctl.errors import BusyError
    from sovctl.runtime import control
    from sovctl.runtime.ports import ensure_free, listener

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
    from sovctl.errors import ConfigError
    from sovctl.store.integrity import check
    from sovctl.store.lock import Lock

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
    from sovctl.errors import UsageError
    from sovctl.runtime import cluster
    from sovctl.runtime.documents import StackState
    from sovctl.runtime.llamacpp import SETUP_HINT, find_binary
    from sovctl.runtime.supervisor import instance_running

    binary = find_binary(cluster.RPC_WORKER)
    out = [Check("rpc", OK, f"{binary} (sovctl worker)") if binary else
           Check("rpc", INFO, "no ggml-rpc-server: this box cannot be a worker", SETUP_HINT)]
    st = StackState.read(home.run / "state.json")
    if st is not None and instance_running(home.run) and any(
            p.kind == cluster.WORKER for p in st.processes):
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
    from sovctl import config
    from sovctl.errors import ConfigError
    from sovctl.provision.profiles import choose

    checks: list[Check] = [_check_python()]
    cfg = None
    try:
        cfg = config.load(home, environ=environ)
        checks.append(Check("config", OK, (f"{home.config_path}" if home.config_path.exists()
                                           else "no sovctl.toml yet (sovctl init writes one)")
                            + (f"; profile {cfg.profile}" if cfg.profile else "")))
    except ConfigError as e:
        checks.append(Check("config", FAIL, e.message, e.hint))
    setting = str(cfg.get("serve.llama_server")) if cfg else ""
    facts = detect(home, setting)
    checks += _check_llama(facts, str(cfg.get("serve.runtime")) if cfg else "auto")
    checks.append(_check_gpu(facts))
    checks += _check_memory(facts)
    checks.append(_check_namespaces())
    checks += _check_cluster(home)
    if cfg is not None:
        checks.append(_check_port(home, str(cfg.get("serve.host")), int(cfg.get("serve.port"))))
    checks.append(_check_lock(home))
    try:
        chosen = choose(home, facts, environ)
        profile, reasons = chosen.profile.name, chosen.reasons
    except ConfigError as e:
        profile, reasons = None, (e.message,)
    return DoctorReport(facts, tuple(checks), profile, tuple(reasons))
