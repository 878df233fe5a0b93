"""The environment a benchmark ran in: host, GPUs, llama.cpp build and sovctl version.

Two runs are comparable when their fingerprints agree; `bench compare` lists what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from sovctl import __version__
from sovctl.bench.telemetry import Nvml, NvmlInfo


@dataclass(frozen=True)
class LlamaBuild:
    llama_cpp_python: str
    gpu_offload: bool
    system_info: str


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what the platform module knows
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def llama_build() -> LlamaBuild:
    import llama_cpp

    return LlamaBuild(
        llama_cpp_python=llama_cpp.__version__,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
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
