"""Facts about the host that more than one part of sovctl reports (bench, audit)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's marketing name, e.g. "Intel(R) Xeon(R) Platinum 8488C"."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what the platform module knows
    # Also reached on Linux where the kernel names no model (many ARM boards).
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Cores, not hyper-threads: llama.cpp runs fastest with one thread per physical core."""
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
