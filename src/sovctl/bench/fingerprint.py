"""The environment a benchmark ran in: host, GPUs, llama.cpp build and sovctl version.

Two runs are comparable when their fingerprints agree; `bench compare` lists what differs.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass

from sovctl import __version__
from sovctl.bench.telemetry import Nvml, NvmlInfo
from sovctl.hostinfo import cpu_model, physical_cores
from sovctl.llamacpp import build_info


@dataclass(frozen=True)
class LlamaBuild:
    llama_cpp_python: str
    gpu_offload: bool
    system_info: str
    # the one llama.cpp compile behind both runtimes, as scripts/build-llama-cpp recorded it
    commit: str
    build_flags: str


@dataclass(frozen=True)
class Fingerprint:
    cpu_model: str
    cpu_cores: int  # physical
    cpu_threads: int  # logical
    ram_bytes: int
    os: str
    python: str
    llama: LlamaBuild
    nvml: NvmlInfo | None
    sovctl: str

    @property
    def digest(self) -> str:
        """A short stable hash of everything above, to tell environments apart at a glance."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# enum ggml_backend_dev_type in ggml-backend.h
_GGML_DEVICE_GPU = 1
_GGML_DEVICE_IGPU = 2


def gpu_offload() -> bool:
    """Whether llama.cpp has a GPU on this host to offload layers to.

    llama_supports_gpu_offload() alone overstates it: a build with the RPC backend answers
    True on any host, as layers could go to a remote server. bench never adds one, so only a
    local GPU device counts.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import llama_cpp as bindings

    if not llama_cpp.llama_supports_gpu_offload():  # which also loads llama.cpp's backends
        return False
    if not llama_cpp.llama_supports_rpc():
        return True
    by_type = bindings._lib.ggml_backend_dev_by_type
    by_type.restype = ctypes.c_void_p
    by_type.argtypes = [ctypes.c_int]
    return any(by_type(t) for t in (_GGML_DEVICE_GPU, _GGML_DEVICE_IGPU))


def llama_build() -> LlamaBuild:
    import llama_cpp

    build = build_info()
    return LlamaBuild(
        llama_cpp_python=llama_cpp.__version__,
        gpu_offload=gpu_offload(),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        commit=build.commit if build else "unknown (not built by scripts/setup)",
        build_flags=build.flags if build else "",
    )


def collect(nvml: Nvml | None) -> Fingerprint:
    import psutil

    return Fingerprint(
        cpu_model=cpu_model(),
        cpu_cores=physical_cores(),
        cpu_threads=psutil.cpu_count(logical=True) or 1,
        ram_bytes=int(psutil.virtual_memory().total),
        os=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=platform.python_version(),
        llama=llama_build(),
        nvml=nvml.info() if nvml else None,
        sovctl=__version__,
    )


def flatten(d: object, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are indexed, so GPU 0's name is nvml.gpus.0.name."""
    out: dict[str, object] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list | tuple):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = d
    return out
