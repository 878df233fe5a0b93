"""Telemetry sampled in a background thread while a benchmark phase runs.

Two paths, picked per phase:
- NVML (nvidia-ml-py) when the library and a driver are present and the work runs on the
  GPU: utilisation, memory used, power, energy (the board's total-energy counter where the
  GPU has one, otherwise power integrated over the samples), clocks, temperature and the
  clock-event (throttle) reasons.
- CPU everywhere else: process CPU time and system utilisation from psutil, the process's
  peak RSS, and energy *estimated* as the configured `bench.cpu_watts` times the phase's
  wall time. An estimate is always labelled as one.

A missing GPU or NVML library is not an error: `open_nvml()` answers None and the CPU path
is used. Nothing here prints.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

ENERGY_COUNTER = "nvml-energy-counter"
ENERGY_INTEGRATED = "nvml-power-integrated"
ENERGY_ESTIMATE = "estimate-cpu-watts"

# NVML clock-event ("throttle") reason bits, named as nvidia-smi names them.
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x0000000000000001, "gpu_idle"),
    (0x0000000000000002, "applications_clocks_setting"),
    (0x0000000000000004, "sw_power_cap"),
    (0x0000000000000008, "hw_slowdown"),
    (0x0000000000000010, "sync_boost"),
    (0x0000000000000020, "sw_thermal_slowdown"),
    (0x0000000000000040, "hw_thermal_slowdown"),
    (0x0000000000000080, "hw_power_brake_slowdown"),
    (0x0000000000000100, "display_clock_setting"),
)


def throttle_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_REASONS if mask & bit)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_bus_width_bits: int | None
    max_memory_clock_mhz: int | None
    power_limit_w: float | None

    @property
    def peak_bandwidth_bytes_s(self) -> float | None:
        """Theoretical memory bandwidth: memory clock x 2 (double data rate) x bus width."""
        if not self.memory_bus_width_bits or not self.max_memory_clock_mhz:
            return None
        return self.max_memory_clock_mhz * 1e6 * 2 * self.memory_bus_width_bits / 8


@dataclass(frozen=True)
class NvmlInfo:
    driver_version: str
    cuda_version: str
    gpus: tuple[GpuInfo, ...]


class Nvml:
    """An initialised NVML session over the GPUs this process may use."""

    def __init__(self, module: Any, handles: list[tuple[int, Any]]) -> None:
        self.nv = module
        self.handles = handles
        self._unsupported: tuple[type[BaseException], ...] = tuple(
            getattr(module, n) for n in ("NVMLError_NotSupported", "NVMLError_NoPermission")
            if hasattr(module, n)
        )

    def optional(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A metric this GPU may not offer: None when NVML says it is unsupported."""
        try:
            return fn(*args)
        except self._unsupported:
            return None

    def info(self) -> NvmlInfo:
        nv = self.nv
        cuda = self.optional(nv.nvmlSystemGetCudaDriverVersion)
        gpus = []
        for index, h in self.handles:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            limit = self.optional(nv.nvmlDeviceGetPowerManagementLimit, h)
            gpus.append(GpuInfo(
                index=index,
                name=_text(nv.nvmlDeviceGetName(h)),
                uuid=_text(self.optional(nv.nvmlDeviceGetUUID, h) or ""),
                memory_total_bytes=int(mem.total),
                memory_bus_width_bits=self.optional(nv.nvmlDeviceGetMemoryBusWidth, h),
                max_memory_clock_mhz=self.optional(nv.nvmlDeviceGetMaxClockInfo, h,
                                                   nv.NVML_CLOCK_MEM),
                power_limit_w=limit / 1000.0 if limit else None,
            ))
        return NvmlInfo(
            driver_version=_text(nv.nvmlSystemGetDriverVersion()),
            cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "",
            gpus=tuple(gpus),
        )

    def close(self) -> None:
        self.nv.nvmlShutdown()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _visible_indices(count: int) -> list[int] | list[str]:
    """GPUs named by CUDA_VISIBLE_DEVICES (indices or GPU- UUIDs), else every GPU."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not raw.strip():
        return list(range(count))
    items = [s.strip() for s in raw.split(",") if s.strip()]
    if all(s.isdigit() for s in items):
        return [int(s) for s in items if int(s) < count]
    return [s for s in items if s.startswith(("GPU-", "MIG-"))]


def open_nvml() -> Nvml | None:
    """An NVML session, or None where there is no NVML library, driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        # No library, no driver, or no device: the CPU path is the answer, not an error.
        return None
    count = pynvml.nvmlDeviceGetCount()
    handles: list[tuple[int, Any]] = []
    for ref in _visible_indices(count):
        if isinstance(ref, int):
            handles.append((ref, pynvml.nvmlDeviceGetHandleByIndex(ref)))
        else:
            h = pynvml.nvmlDeviceGetHandleByUUID(ref)
            handles.append((pynvml.nvmlDeviceGetIndex(h), h))
    if not handles:
        pynvml.nvmlShutdown()
        return None
    return Nvml(pynvml, handles)


@dataclass(frozen=True)
class GpuPhase:
    index: int
    util_mean_pct: float | None
    util_max_pct: float | None
    memory_used_max_bytes: int | None
    power_mean_w: float | None
    power_max_w: float | None
    energy_j: float | None
    energy_method: str
    sm_clock_mean_mhz: float | None
    mem_clock_mean_mhz: float | None
    temperature_max_c: float | None
    throttle_reasons: tuple[str, ...]


@dataclass(frozen=True)
class PhaseTelemetry:
    source: str  # "nvml" | "cpu"
    seconds: float
    samples: int
    process_cpu_pct: float  # process CPU time over wall time, as top shows it (100 = one core)
    system_cpu_pct: float  # all CPUs, 0..100
    rss_max_bytes: int
    gpus: tuple[GpuPhase, ...]
    energy_j: float
    energy_method: str
    energy_estimated: bool
    energy_scope: str  # "gpu": the GPU boards only | "cpu": the CPU package, estimated

    @property
    def power_mean_w(self) -> float:
        return self.energy_j / self.seconds if self.seconds > 0 else 0.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class _GpuTrack:
    def __init__(self, index: int) -> None:
        self.index = index
        self.util: list[float] = []
        self.mem: list[int] = []
        self.power: list[tuple[float, float]] = []  # (monotonic time, watts)
        self.sm: list[float] = []
        self.memclk: list[float] = []
        self.temp: list[float] = []
        self.reasons = 0
        self.energy_start_mj: int | None = None


class PhaseSampler:
    """Context manager: samples in a background thread from enter to exit.

    `result` holds the PhaseTelemetry after exit. An error inside the sampling thread is
    re-raised in the caller's thread at exit, never swallowed.
    """

    def __init__(self, nvml: Nvml | None, interval: float, cpu_watts: float) -> None:
        import psutil

        self.nvml = nvml
        self.interval = interval
        self.cpu_watts = cpu_watts
        self.proc = psutil.Process()
        self._psutil = psutil
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._rss: list[int] = []
        self._tracks = [_GpuTrack(i) for i, _ in nvml.handles] if nvml else []
        self.result: PhaseTelemetry | None = None

    def __enter__(self) -> PhaseSampler:
        if self.nvml:
            nv = self.nvml.nv
            for track, (_, h) in zip(self._tracks, self.nvml.handles, strict=True):
                track.energy_start_mj = self.nvml.optional(
                    nv.nvmlDeviceGetTotalEnergyConsumption, h)
        self._cpu0 = self.proc.cpu_times()
        self._psutil.cpu_percent(None)  # primes the system-wide counter for this window
        self._t0 = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="sovctl-telemetry", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._sample()
        except BaseException as e:  # handed to the caller's thread in __exit__
            self._error = e

    def _sample(self) -> None:
        self._rss.append(self.proc.memory_info().rss)
        if not self.nvml:
            return
        nv, opt = self.nvml.nv, self.nvml.optional
        now = time.monotonic()
        for track, (_, h) in zip(self._tracks, self.nvml.handles, strict=True):
            util = opt(nv.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                track.util.append(float(util.gpu))
            mem = opt(nv.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                track.mem.append(int(mem.used))
            power = opt(nv.nvmlDeviceGetPowerUsage, h)
            if power is not None:
                track.power.append((now, power / 1000.0))
            sm = opt(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            if sm is not None:
                track.sm.append(float(sm))
            memclk = opt(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
            if memclk is not None:
                track.memclk.append(float(memclk))
            temp = opt(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            if temp is not None:
                track.temp.append(float(temp))
            reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                nv.nvmlDeviceGetCurrentClocksThrottleReasons
            reasons = opt(reasons_fn, h)
            if reasons is not None:
                track.reasons |= int(reasons)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if exc_type is not None:
            return
        if self._error is not None:
            raise self._error
        self._sample()
        seconds = time.monotonic() - self._t0
        cpu1 = self.proc.cpu_times()
        busy = (cpu1.user - self._cpu0.user) + (cpu1.system - self._cpu0.system)
        gpus = tuple(self._finish_gpu(t, seconds) for t in self._tracks)
        source = "nvml" if gpus else "cpu"
        if gpus and all(g.energy_j is not None for g in gpus):
            energy = sum(g.energy_j or 0.0 for g in gpus)
            methods = {g.energy_method for g in gpus}
            method = ENERGY_COUNTER if methods == {ENERGY_COUNTER} else ENERGY_INTEGRATED
            scope, estimated = "gpu", False
        else:
            # No power meter, or a GPU that reports neither energy nor power: estimate.
            energy = self.cpu_watts * seconds
            method, scope, estimated = ENERGY_ESTIMATE, "cpu", True
        self.result = PhaseTelemetry(
            source=source,
            seconds=seconds,
            samples=len(self._rss),
            process_cpu_pct=100.0 * busy / seconds if seconds > 0 else 0.0,
            system_cpu_pct=float(self._psutil.cpu_percent(None)),
            rss_max_bytes=max(self._rss),
            gpus=gpus,
            energy_j=energy,
            energy_method=method,
            energy_estimated=estimated,
            energy_scope=scope,
        )

    def _finish_gpu(self, t: _GpuTrack, seconds: float) -> GpuPhase:
        assert self.nvml is not None
        h = dict(self.nvml.handles)[t.index]
        energy: float | None = None
        method = ENERGY_INTEGRATED
        if t.energy_start_mj is not None:
            end = self.nvml.optional(self.nvml.nv.nvmlDeviceGetTotalEnergyConsumption, h)
            if end is not None:
                energy, method = (end - t.energy_start_mj) / 1000.0, ENERGY_COUNTER
        if energy is None:
            if len(t.power) >= 2:
                energy = _integrate(t.power)
            else:
                method = "unavailable"
        watts = [w for _, w in t.power]
        return GpuPhase(
            index=t.index,
            util_mean_pct=_mean(t.util),
            util_max_pct=max(t.util) if t.util else None,
            memory_used_max_bytes=max(t.mem) if t.mem else None,
            power_mean_w=energy / seconds if energy is not None and seconds > 0 else _mean(watts),
            power_max_w=max(watts) if watts else None,
            energy_j=energy,
            energy_method=method,
            sm_clock_mean_mhz=_mean(t.sm),
            mem_clock_mean_mhz=_mean(t.memclk),
            temperature_max_c=max(t.temp) if t.temp else None,
            throttle_reasons=throttle_names(t.reasons & ~0x1),  # idle is not a throttle
        )


def _integrate(points: list[tuple[float, float]]) -> float:
    """Joules from (time, watts) samples by the trapezoid rule; one sample counts as nothing."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in itertools.pairwise(points))
