"""How close token generation comes to the memory-bandwidth bound.

Generating one token reads every weight once, so tg tokens/s can never exceed
peak bandwidth / model bytes. The fraction achieved is model bytes x tokens/s / peak.

The peak comes from, in order: `bench.memory_bandwidth_gbs` when set (the operator's figure);
NVML's maximum memory clock x 2 (double data rate) x bus width when the weights are on a GPU;
otherwise a short memory-copy test on the CPU (numpy, one copy per thread, STREAM-copy
accounting: bytes read + bytes written), which gives a practical peak, not the datasheet one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sovctl.bench.telemetry import NvmlInfo

SOURCE_CONFIG = "config"
SOURCE_NVML = "nvml-clock-x-bus-width"
SOURCE_MEMCPY = "measured-memcpy"


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float
    source: str
    detail: str


@dataclass(frozen=True)
class Roofline:
    model_bytes: int
    tokens_per_s: float
    achieved_bytes_per_s: float
    peak_bytes_per_s: float
    peak_source: str
    fraction: float
    bound_tokens_per_s: float  # the most tg tokens/s this bandwidth allows


def measure_cpu_bandwidth(mib: int = 256, threads: int = 1, rounds: int = 8) -> Bandwidth:
    """Best of `rounds` parallel copies of `mib` MiB split across `threads` threads."""
    import numpy as np

    n = mib * 1024 * 1024 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    threads = max(1, threads)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def part(b: tuple[int, int]) -> None:
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, bounds))  # touch every page once before timing
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(part, bounds))
            best = min(best, time.perf_counter() - t0)
    return Bandwidth(
        bytes_per_s=2 * src.nbytes / best,
        source=SOURCE_MEMCPY,
        detail=f"numpy copy of {mib} MiB on {threads} thread(s), best of {rounds}",
    )


def gpu_bandwidth(info: NvmlInfo) -> Bandwidth | None:
    """Sum over the GPUs that report clock and bus width (layers split across them)."""
    peaks = [(g.name, g.peak_bandwidth_bytes_s) for g in info.gpus]
    known = [(name, p) for name, p in peaks if p]
    if not known:
        return None
    return Bandwidth(
        bytes_per_s=sum(p for _, p in known),
        source=SOURCE_NVML,
        detail=", ".join(f"{name}: {p / 1e9:.0f} GB/s" for name, p in known),
    )


def roofline(model_bytes: int, tokens_per_s: float, peak: Bandwidth) -> Roofline:
    achieved = model_bytes * tokens_per_s
    return Roofline(
        model_bytes=model_bytes,
        tokens_per_s=tokens_per_s,
        achieved_bytes_per_s=achieved,
        peak_bytes_per_s=peak.bytes_per_s,
        peak_source=peak.source,
        fraction=achieved / peak.bytes_per_s if peak.bytes_per_s > 0 else 0.0,
        bound_tokens_per_s=peak.bytes_per_s / model_bytes if model_bytes else 0.0,
    )
