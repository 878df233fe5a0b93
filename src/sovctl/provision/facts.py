"""What this machine is: the facts `doctor`, `init`, `plan` and `up` decide from (the checks
of `sovctl doctor` are `sovctl.provision.doctor`).

Each fact has one source elsewhere in sovctl, used here rather than measured again: the CPU
from `sovctl.hostinfo`, GPUs from the NVML wrapper of `sovctl.bench.telemetry`, whether this
llama.cpp build can offload from `sovctl.bench.fingerprint.gpu_offload`, the build itself from
`sovctl.llamacpp`.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from sovctl.bench.fingerprint import gpu_offload
from sovctl.bench.telemetry import open_nvml
from sovctl.engines import DISTRIBUTION, PREFERRED
from sovctl.errors import ConfigError
from sovctl.home import Home
from sovctl.hostinfo import cpu_model, physical_cores
from sovctl.llamacpp import build_info, find_binary


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


    try:
        version: str | None = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = None
    build = build_info()
    offload, error = False, None
    if version is not None:
        try:
            offload = gpu_offload()
        except (ImportError, OSError, AttributeError) as e:
            error = f"{type(e).__name__}: {e}"
    try:
        server = find_binary(PREFERRED.binary, llama_server_setting)
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
