"""`sovctl bench NAME...`: the model micro-benchmark from store name to history record.

For each model, each GPU-layers value loads the weights once; each thread count and batch
size gets a context; each context runs micro.run_phases with telemetry around every phase.
Energy, cost and roofline figures are derived from the measurements, and the whole run is
appended to the history with the environment fingerprint.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.bench import costs as costs_mod
from sovctl.bench import fingerprint as fp_mod
from sovctl.bench import history, micro, roofline, telemetry
from sovctl.bench.stats import mean
from sovctl.config import CostSettings, Settings
from sovctl.errors import NotFoundError, UsageError
from sovctl.home import Home
from sovctl.hostinfo import physical_cores
from sovctl.result import jsonable, utcnow
from sovctl.store.blobs import BlobStore
from sovctl.store.gguf_info import facts_for
from sovctl.store.lock import Lock

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sweep:
    """The options of one `sovctl bench` invocation; lists are swept as a product."""

    n_prompt: int
    n_gen: int
    reps: int
    threads: tuple[int, ...]
    gpu_layers: tuple[int, ...]
    batch: tuple[int, ...]
    ubatch: int
    flash_attn: bool
    repack: bool

    def settings(self) -> Iterator[micro.MicroSettings]:
        for ngl in self.gpu_layers:
            for t in self.threads:
                for b in self.batch:
                    yield micro.MicroSettings(
                        n_prompt=self.n_prompt, n_gen=self.n_gen, reps=self.reps, threads=t,
                        n_gpu_layers=ngl, batch=b, ubatch=self.ubatch,
                        flash_attn=self.flash_attn, repack=self.repack,
                    )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    file_bytes: int
    weights_bytes: int
    parameters: int
    layers: int
    description: str
    architecture: str
    quantization: str


@dataclass(frozen=True)
class PhaseResult:
    test: str
    tokens: int  # per repetition
    reps: int
    tps_mean: float
    tps_sd: float
    samples_tps: tuple[float, ...]
    telemetry: telemetry.PhaseTelemetry
    costs: costs_mod.Costs


@dataclass(frozen=True)
class Result:
    model: ModelInfo
    settings: micro.MicroSettings
    on_gpu: bool  # weights offloaded and NVML watching: telemetry and roofline are the GPU's
    pp: PhaseResult | None
    tg: PhaseResult | None
    roofline: roofline.Roofline | None


@dataclass(frozen=True)
class BenchRun:
    schema: str
    id: str
    kind: str
    started_at: str
    finished_at: str
    fingerprint: fp_mod.Fingerprint
    fingerprint_digest: str
    config: dict[str, Any]  # every bench.* and cost.* setting, with the layer it came from
    models: dict[str, str]  # name -> sha256
    bandwidth: dict[str, Any] | None  # the CPU peak, when one was measured or configured
    results: tuple[Result, ...]
    history: str  # the file this run was appended to

    @property
    def estimated(self) -> bool:
        return any(p.costs.estimated for r in self.results for p in (r.pp, r.tg) if p)

    def rows(self) -> tuple[PhaseRow, ...]:
        """The run flattened for CSV and Markdown: one row per model x settings x phase."""
        return tuple(PhaseRow.of(self.id, r, p) for r in self.results for p in (r.pp, r.tg)
                     if p is not None)


@dataclass(frozen=True)
class PhaseRow:
    """One phase of one result, flat; the field names are the CSV columns."""

    run_id: str
    model: str
    sha256: str
    weights_bytes: int
    parameters: int
    backend: str  # "GPU" | "CPU"
    threads: int
    n_gpu_layers: int
    batch: int
    ubatch: int
    flash_attn: bool
    repack: bool
    test: str
    tokens: int
    reps: int
    tokens_per_s: float
    tokens_per_s_sd: float
    joules_per_token: float
    tokens_per_joule: float
    wh_per_mtok: float
    electricity_per_mtok: float
    hardware_per_mtok: float
    local_per_mtok: float
    cloud_per_mtok: float
    currency: str
    energy_estimated: bool
    energy_method: str
    energy_scope: str
    process_cpu_pct: float
    rss_max_bytes: int
    gpu_util_mean_pct: float | None  # mean over the GPUs
    gpu_power_mean_w: float | None  # summed over the GPUs
    gpu_temp_max_c: float | None  # hottest GPU
    throttle_reasons: str  # every GPU's, sorted, ";"-separated
    roofline_fraction: float | None  # tg rows only: the roofline is about generation
    peak_bandwidth_gbs: float | None
    peak_bandwidth_source: str | None

    @classmethod
    def of(cls, run_id: str, r: Result, p: PhaseResult) -> PhaseRow:
        s, tel, c, gpus = r.settings, p.telemetry, p.costs, p.telemetry.gpus
        roof = r.roofline if p is r.tg else None
        return cls(
            run_id=run_id, model=r.model.name, sha256=r.model.sha256,
            weights_bytes=r.model.weights_bytes, parameters=r.model.parameters,
            backend="GPU" if r.on_gpu else "CPU", threads=s.threads,
            n_gpu_layers=s.n_gpu_layers, batch=s.batch, ubatch=s.ubatch,
            flash_attn=s.flash_attn, repack=s.repack, test=p.test, tokens=p.tokens,
            reps=p.reps, tokens_per_s=p.tps_mean, tokens_per_s_sd=p.tps_sd,
            joules_per_token=c.joules_per_token, tokens_per_joule=c.tokens_per_joule,
            wh_per_mtok=c.wh_per_mtok, electricity_per_mtok=c.electricity_per_mtok,
            hardware_per_mtok=c.hardware_per_mtok, local_per_mtok=c.local_per_mtok,
            cloud_per_mtok=c.cloud_per_mtok, currency=c.currency,
            energy_estimated=c.estimated, energy_method=tel.energy_method,
            energy_scope=tel.energy_scope, process_cpu_pct=tel.process_cpu_pct,
            rss_max_bytes=tel.rss_max_bytes,
            gpu_util_mean_pct=_known(mean, [g.util_mean_pct for g in gpus]),
            gpu_power_mean_w=_known(sum, [g.power_mean_w for g in gpus]),
            gpu_temp_max_c=_known(max, [g.temperature_max_c for g in gpus]),
            throttle_reasons=";".join(sorted({t for g in gpus for t in g.throttle_reasons})),
            roofline_fraction=roof.fraction if roof else None,
            peak_bandwidth_gbs=roof.peak_bytes_per_s / 1e9 if roof else None,
            peak_bandwidth_source=roof.peak_source if roof else None,
        )


def _known(combine: Callable[[list[float]], float], xs: list[float | None]) -> float | None:
    """`combine` over the GPUs that reported the figure; None when none did."""
    known = [x for x in xs if x is not None]
    return combine(known) if known else None


def new_run_id() -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(2)}"


def default_threads() -> int:
    return physical_cores()


def default_gpu_layers() -> int:
    """All layers where llama.cpp has a GPU to offload to, else none (what actually happens)."""
    return -1 if fp_mod.gpu_offload() else 0


@dataclass(frozen=True)
class _Target:
    name: str
    sha256: str
    size: int
    path: Path
    architecture: str
    quantization: str


def resolve_models(home: Home, names: list[str]) -> list[_Target]:
    lock = Lock.load(home)
    blobs = BlobStore(home)
    explicit = bool(names)
    if not names:
        names = sorted(lock.entries)
        if not names:
            raise NotFoundError("no models in the store to benchmark",
                                hint="add one with 'sovctl pull REF', then 'sovctl bench NAME'")
    targets = []
    for name in dict.fromkeys(names):
        entry = lock.get(name)
        path = blobs.path(entry.sha256)
        if not blobs.has(entry.sha256):
            raise NotFoundError(f"{name} is pinned but its blob is missing",
                                hint=f"fetch it again: sovctl rm {name} && sovctl pull {entry.ref}")
        facts = facts_for(home, entry.sha256, path)
        if facts.embedding:
            if explicit:
                raise UsageError(f"{name} is an embedding model; bench measures generation",
                                 hint="name a chat or completion model")
            continue
        targets.append(_Target(name, entry.sha256, entry.size, path, facts.architecture,
                               facts.quantization))
    if not targets:
        raise NotFoundError("the store holds only embedding models; bench measures generation",
                            hint="pull a chat or completion model")
    return targets


class _Bandwidths:
    """Peak bandwidth for the roofline, each source worked out at most once per run."""

    def __init__(self, configured_gbs: float, nvml_info: telemetry.NvmlInfo | None,
                 threads: int) -> None:
        self.configured = configured_gbs
        self.nvml_info = nvml_info
        self.threads = threads
        self._cpu: roofline.Bandwidth | None = None

    def for_result(self, on_gpu: bool) -> roofline.Bandwidth | None:
        if self.configured > 0:
            return roofline.Bandwidth(self.configured * 1e9, roofline.SOURCE_CONFIG,
                                      "bench.memory_bandwidth_gbs")
        if on_gpu and self.nvml_info:
            return roofline.gpu_bandwidth(self.nvml_info)
        if self._cpu is None:
            self._cpu = roofline.measure_cpu_bandwidth(threads=self.threads)
        return self._cpu

    @property
    def cpu(self) -> roofline.Bandwidth | None:
        if self.configured > 0:
            return self.for_result(False)
        return self._cpu


def run(home: Home, names: list[str], sweep: Sweep, settings: Settings,
        progress: Progress | None = None, verbose: bool = False) -> BenchRun:
    """Benchmark each named model (default: every generating model in the store)."""
    for s in sweep.settings():
        s.check()
    targets = resolve_models(home, names)
    interval = settings.bench.sample_interval
    cpu_watts = settings.bench.cpu_watts
    if interval <= 0 or cpu_watts < 0:
        raise UsageError("bench.sample_interval must be > 0 and bench.cpu_watts >= 0",
                         hint="fix [bench] in sovctl.toml")
    say = progress or (lambda _msg: None)
    micro.quiet_llama(verbose)
    started = utcnow()
    run_id = new_run_id()
    nvml = telemetry.open_nvml()
    try:
        fingerprint = fp_mod.collect(nvml)
        bandwidths = _Bandwidths(settings.bench.memory_bandwidth_gbs,
                                 fingerprint.nvml, fingerprint.cpu_threads)
        results: list[Result] = []
        for target in targets:
            for ngl in sweep.gpu_layers:
                say(f"{target.name}: loading (GPU layers {ngl})")
                with closing(micro.LoadedModel(target.path, ngl, sweep.repack)) as model:
                    info = ModelInfo(
                        name=target.name, sha256=target.sha256, file_bytes=target.size,
                        weights_bytes=model.facts.bytes, parameters=model.facts.parameters,
                        layers=model.facts.layers, description=model.facts.description,
                        architecture=target.architecture, quantization=target.quantization,
                    )
                    for s in sweep.settings():
                        if s.n_gpu_layers != ngl:
                            continue
                        on_gpu = bool(ngl != 0 and fingerprint.llama.gpu_offload and nvml)
                        results.append(_bench_one(
                            model, info, s, on_gpu, nvml if on_gpu else None, interval,
                            cpu_watts, settings.cost, bandwidths, say,
                        ))
    finally:
        if nvml:
            nvml.close()
    cpu_bw = bandwidths.cpu
    record = BenchRun(
        schema=history.RECORD_SCHEMA,
        id=run_id,
        kind="micro",
        started_at=started,
        finished_at=utcnow(),
        fingerprint=fingerprint,
        fingerprint_digest=fingerprint.digest,
        config={k: {"value": v, "from": settings.source(k)}
                for k, v in sorted(settings.items("bench", "cost"))},
        models={t.name: t.sha256 for t in targets},
        bandwidth=jsonable(cpu_bw) if cpu_bw else None,
        results=tuple(results),
        history=str(history.history_path(home)),
    )
    history.append(home, jsonable(record))
    return record


def _bench_one(model: micro.LoadedModel, info: ModelInfo, s: micro.MicroSettings,
               on_gpu: bool, nvml: telemetry.Nvml | None, interval: float, cpu_watts: float,
               cost_cfg: CostSettings, bandwidths: _Bandwidths,
               say: Progress) -> Result:
    label = f"{info.name} {history.settings_label(jsonable(s))}"
    samplers: dict[str, telemetry.PhaseSampler] = {}

    @contextmanager
    def measure(test: str) -> Iterator[None]:
        say(f"{label}: {test} x {s.reps}")
        sampler = telemetry.PhaseSampler(nvml, interval, cpu_watts)
        samplers[test] = sampler
        with sampler:
            yield

    pp_t, tg_t = micro.run_phases(model, s, measure)

    def phase(t: micro.Timing | None, prompt: bool) -> PhaseResult | None:
        if t is None:
            return None
        tel = samplers[t.test].result
        assert tel is not None
        jpt = tel.energy_j / (t.tokens * len(t.seconds))
        return PhaseResult(
            test=t.test, tokens=t.tokens, reps=len(t.seconds), tps_mean=t.tps_mean,
            tps_sd=t.tps_sd, samples_tps=t.samples_tps, telemetry=tel,
            costs=costs_mod.derive(t.tps_mean, jpt, tel.energy_estimated, cost_cfg, prompt),
        )

    roof = None
    if tg_t is not None:
        peak = bandwidths.for_result(on_gpu)
        if peak is not None:
            roof = roofline.roofline(info.weights_bytes, tg_t.tps_mean, peak)
    return Result(model=info, settings=s, on_gpu=on_gpu, pp=phase(pp_t, True),
                  tg=phase(tg_t, False), roofline=roof)
