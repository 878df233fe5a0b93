"""The memory a stack's runtimes may hold together, and what each holds.

A plan sizes every runtime with `sovctl plan`'s estimate (sovctl.sizing) and carries the budget
(`[serve] memory_limit`, or what is available when the stack starts less `memory_reserve`);
the supervisor admits a runtime loaded on demand only when its estimate fits beside those
running, and reports what each actually holds: its resident set, and the VRAM NVML counts for
its processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sovctl.bench.telemetry import open_nvml
from sovctl.config import ServeSettings
from sovctl.errors import ConfigError
from sovctl.runtime.documents import MemoryBudget
from sovctl.sizing import runtime_need, shape_of
from sovctl.store.header import read_local
from sovctl.units import human_bytes, parse_size


def budget(serve: ServeSettings) -> MemoryBudget:
    """The budget now: RAM from memory_limit or from what is available less memory_reserve,
    and the free VRAM of the GPUs NVML sees."""
    import psutil

    if serve.memory_limit:
        ram, source = parse_size(serve.memory_limit), "[serve] memory_limit"
    else:
        available = int(psutil.virtual_memory().available)
        reserve = parse_size(serve.memory_reserve)
        ram = max(available - reserve, 0)
        source = (f"available now ({human_bytes(available)}) less [serve] memory_reserve "
                  f"({human_bytes(reserve)})")
    session = open_nvml()
    if session is None:
        return MemoryBudget(ram, source)
    try:
        free = sum(int(session.nv.nvmlDeviceGetMemoryInfo(h).free) for _, h in session.handles)
        return MemoryBudget(ram, source, free, f"free on {len(session.handles)} GPU(s), NVML")
    finally:
        session.close()


@dataclass(frozen=True)
class Need:
    ram: int
    vram: int


def need(blob: Path, label: str, n_ctx: int, parallel: int, n_gpu_layers: int, gpus: bool,
         projector: int = 0) -> Need:
    """What a runtime serving `blob` as configured holds, by the plan's estimate."""
    ram, vram = runtime_need(shape_of(read_local(blob, label=label)), n_ctx, parallel,
                             n_gpu_layers, gpus, projector)
    return Need(ram, vram)


@dataclass(frozen=True)
class Sized:
    name: str
    need: Need
    always: bool  # loaded with the stack and never unloaded


def admit(models: Sequence[Sized], b: MemoryBudget) -> None:
    """Refuse, before anything starts, a set of runtimes that could never be served under the
    budget: those loaded always must fit together, and each loaded on demand beside them."""
    resident = [m for m in models if m.always]
    base_ram = sum(m.need.ram for m in resident)
    base_vram = sum(m.need.vram for m in resident)
    hint = ("raise [serve] memory_limit, serve fewer models with load = \"always\", or lower "
            "their parallel or n_ctx; 'sovctl plan NAME' shows what each needs")
    if base_ram > b.ram or base_vram > b.vram:
        each = ", ".join(f"{m.name} {_both(m.need.ram, m.need.vram)}" for m in resident)
        raise ConfigError(f"the models loaded always need {_both(base_ram, base_vram)} together "
                          f"({each}), over the memory budget: {describe(b)}", hint=hint)
    for m in models:
        if m.always:
            continue
        if base_ram + m.need.ram > b.ram or base_vram + m.need.vram > b.vram:
            beside = (f" beside the models loaded always ({_both(base_ram, base_vram)})"
                      if resident else "")
            raise ConfigError(
                f"{m.name} cannot be loaded: it needs {_both(m.need.ram, m.need.vram)}{beside}, "
                f"over the memory budget: {describe(b)}", hint=hint)


def _both(ram: int, vram: int) -> str:
    return human_bytes(ram) + (f" of RAM and {human_bytes(vram)} of VRAM" if vram else "")


def describe(b: MemoryBudget) -> str:
    text = f"{human_bytes(b.ram)} of RAM ({b.ram_source})"
    return text + (f", {human_bytes(b.vram)} of VRAM ({b.vram_source})" if b.vram else "")


def held(pid: int, vram: dict[int, int] | None = None) -> tuple[int | None, int | None]:
    """(resident bytes, VRAM bytes) of a runtime: its process and children; VRAM from
    `vram` (pid -> bytes, as `gpu_use` read it), None where NVML sees no GPU."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return None, None
    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
        except psutil.Error:
            continue
    gpu = None if vram is None else sum(vram.get(p.pid, 0) for p in procs)
    return rss, gpu


def gpu_use() -> dict[int, int] | None:
    """VRAM each process uses (pid -> bytes) over the GPUs NVML sees; None without NVML."""
    session = open_nvml()
    if session is None:
        return None
    try:
        used: dict[int, int] = {}
        for _, h in session.handles:
            for getter in ("nvmlDeviceGetComputeRunningProcesses",
                           "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    found = getattr(session.nv, getter)(h)
                except session.nv.NVMLError:
                    continue
                for proc in found:
                    if proc.usedGpuMemory is not None:
                        used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory)
        return used
    finally:
        session.close()
