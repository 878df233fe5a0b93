"""The tables of `sovctl bench`, `bench compare`, `bench history` and `bench serve`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from sovctl.bench.history import settings_label
from sovctl.cli._common import human_bytes, human_params

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.bench.history import Comparison, RunSummary
    from sovctl.bench.load import LoadRun
    from sovctl.bench.runner import BenchRun

# Marks every figure built on an estimated energy.
ESTIMATED = "*"

_ENERGY_SOURCE = {"nvml-energy-counter": "nvml counter", "nvml-power-integrated": "nvml power",
                  "estimate-cpu-watts": "cpu_watts"}


def _table(title: str | None = None) -> Table:
    return Table(title=title, box=None, pad_edge=False, title_justify="left")


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def run(c: Console, result: BenchRun) -> None:
    seen: set[str] = set()
    for r in result.results:
        m = r.model
        if m.name not in seen:
            seen.add(m.name)
            c.print(f"{m.name}: {m.description}, {human_bytes(m.weights_bytes)} of weights, "
                    f"{human_params(m.parameters)} parameters, sha256 {m.sha256[:12]}",
                    highlight=False)
    phases = [(r, p) for r in result.results for p in (r.pp, r.tg) if p]

    t = _table("throughput")
    for col in ("MODEL", "BACKEND", "THREADS", "NGL", "BATCH", "TEST", "TOKENS/S", "SD"):
        t.add_column(col, no_wrap=True,
                     justify="right" if col in ("TOKENS/S", "SD") else "left")
    for r, p in phases:
        t.add_row(r.model.name, "GPU" if r.on_gpu else "CPU", str(r.settings.threads),
                  str(r.settings.n_gpu_layers), str(r.settings.batch), p.test,
                  f"{p.tps_mean:.2f}", f"± {p.tps_sd:.2f}")
    c.print(t)
    c.print()

    currency = phases[0][1].costs.currency if phases else ""
    e = _table("energy")
    for col in ("MODEL", "TEST", "SOURCE", "POWER", "ENERGY", "J/TOKEN", "TOKENS/J",
                "WH/MTOK"):
        e.add_column(col, no_wrap=True, justify="left" if col in ("MODEL", "TEST", "SOURCE")
                     else "right")
    for r, p in phases:
        k, tel = p.costs, p.telemetry
        mark = ESTIMATED if k.estimated else ""
        e.add_row(r.model.name, p.test, _ENERGY_SOURCE.get(tel.energy_method, tel.energy_method),
                  f"{tel.power_mean_w:.1f} W{mark}", f"{tel.energy_j:.3g} J{mark}",
                  f"{k.joules_per_token:.3g}{mark}", f"{k.tokens_per_joule:.3g}{mark}",
                  f"{k.wh_per_mtok:.3g}{mark}")
    c.print(e)
    c.print()

    ct = _table(f"cost per million tokens ({currency})")
    for col in ("MODEL", "TEST", "ELECTRICITY", "HARDWARE", "LOCAL TOTAL", "CLOUD"):
        ct.add_column(col, no_wrap=True, justify="left" if col in ("MODEL", "TEST") else "right")
    for r, p in phases:
        k = p.costs
        mark = ESTIMATED if k.estimated else ""
        ct.add_row(r.model.name, p.test, f"{k.electricity_per_mtok:.3g}{mark}",
                   f"{k.hardware_per_mtok:.3g}", f"{k.local_per_mtok:.3g}{mark}",
                   f"{k.cloud_per_mtok:.3g}")
    c.print(ct)
    c.print()

    tt = _table("telemetry")
    for col in ("MODEL", "TEST", "SAMPLES", "CPU %", "SYSTEM CPU %", "PEAK RSS"):
        tt.add_column(col, no_wrap=True)
    for r, p in phases:
        tel = p.telemetry
        tt.add_row(r.model.name, p.test, str(tel.samples), f"{tel.process_cpu_pct:.0f}",
                   f"{tel.system_cpu_pct:.0f}", human_bytes(tel.rss_max_bytes))
    c.print(tt)
    c.print()

    if any(p.telemetry.gpus for _, p in phases):
        gt = _table("GPU telemetry (NVML)")
        for col in ("MODEL", "TEST", "GPU", "GPU %", "MEM USED", "POWER", "TEMP", "SM MHZ",
                    "THROTTLE"):
            gt.add_column(col, no_wrap=col != "THROTTLE")
        for r, p in phases:
            for g in p.telemetry.gpus:
                gt.add_row(
                    r.model.name, p.test, str(g.index), _num(g.util_mean_pct, "{:.0f}"),
                    "-" if g.memory_used_max_bytes is None
                    else human_bytes(g.memory_used_max_bytes),
                    _num(g.power_mean_w, "{:.0f} W"), _num(g.temperature_max_c, "{:.0f} C"),
                    _num(g.sm_clock_mean_mhz, "{:.0f}"),
                    ", ".join(g.throttle_reasons) or "none",
                )
        c.print(gt)
        c.print()

    for r in result.results:
        if r.roofline:
            rf = r.roofline
            c.print(
                f"roofline {r.model.name} {settings_label(r.settings.__dict__)} "
                f"tg{r.settings.n_gen}: {100 * rf.fraction:.1f}% of the memory-bandwidth bound "
                f"({rf.achieved_bytes_per_s / 1e9:.2f} of {rf.peak_bytes_per_s / 1e9:.1f} GB/s, "
                f"peak from {rf.peak_source}; bound {rf.bound_tokens_per_s:.0f} tokens/s)",
                highlight=False,
            )
            if rf.fraction > 1:
                c.print("  above 100%: the weights fit in a CPU cache, or the peak is too low "
                        "(set bench.memory_bandwidth_gbs)", highlight=False)
    if result.estimated:
        watts = result.config["bench.cpu_watts"]["value"]
        c.print(f"{ESTIMATED} estimated: no power meter here, so energy = bench.cpu_watts "
                f"({watts:g} W) x phase time; every figure built on it is an estimate",
                highlight=False)
    if any(p.telemetry.energy_scope == "gpu" for _, p in phases):
        c.print("GPU energy is measured by NVML for the GPU boards only; the host is not "
                "included", highlight=False)
    if not result.config["cost.hardware_price"]["value"]:
        c.print("hardware cost is 0: set cost.hardware_price in sovctl.toml to amortise the box",
                highlight=False)
    c.print(f"recorded as run {result.id} in {result.history}; compare with "
            "'sovctl bench compare'", highlight=False)


def compare(c: Console, cmp: Comparison) -> None:
    c.print(f"run {cmp.run} ({cmp.run_started_at}) against {cmp.against} "
            f"({cmp.against_started_at})", highlight=False)
    t = _table()
    for col in ("RESULT", "TEST", "BEFORE T/S", "NOW T/S", "CHANGE", "VERDICT"):
        t.add_column(col, no_wrap=col != "RESULT")
    colour = {"faster": "green", "slower": "red", "within spread": "dim"}
    for x in cmp.changes:
        t.add_row(f"{x.model} {settings_label(x.settings)}", x.test,
                  f"{x.against_mean:.1f} ± {x.against_sd:.1f}", f"{x.mean:.1f} ± {x.sd:.1f}",
                  f"{x.delta_pct:+.1f}%", f"[{colour[x.verdict]}]{x.verdict}[/]")
    c.print(t)
    for u in cmp.unmatched:
        c.print(f"no counterpart in {cmp.against}: {u}", highlight=False)
    if cmp.environment:
        c.print("environment changes:")
        for ch in cmp.environment:
            c.print(f"  {ch.key}: {ch.against!r} -> {ch.run!r}", highlight=False)
    else:
        c.print("environment: unchanged")


def history(c: Console, rows: list[RunSummary]) -> None:
    if not rows:
        c.print("no runs yet: 'sovctl bench NAME' records one")
        return
    t = _table()
    for col in ("ID", "STARTED", "MODELS", "RESULTS", "ENVIRONMENT"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.id, r.started_at, ", ".join(r.models), str(r.results), r.fingerprint)
    c.print(t)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def serve(c: Console, run: LoadRun) -> None:
    served = f" ({run.runtime})" if run.runtime else ""
    c.print(f"{run.url} model {run.model}{served}: {run.settings.requests} requests per level, "
            f"~{run.settings.prompt_tokens} prompt tokens, up to {run.settings.max_tokens} "
            f"output tokens, streaming", highlight=False)
    t = _table("throughput")
    for col in ("CONCURRENCY", "OK", "ERRORS", "REQ/S", "OUTPUT TOK/S", "TOKENS", "WALL S"):
        t.add_column(col, justify="right")
    for lv in run.levels:
        t.add_row(str(lv.concurrency), str(lv.completed),
                  f"[red]{lv.errors}[/]" if lv.errors else "0", f"{lv.requests_per_s:.2f}",
                  f"{lv.output_tokens_per_s:.1f}", str(lv.output_tokens), f"{lv.wall_s:.2f}")
    c.print(t)
    c.print()
    lt = _table("latency (ms)")
    for col in ("CONCURRENCY", "METRIC", "MEAN", "MEDIAN", "P95", "P99"):
        lt.add_column(col, justify="left" if col == "METRIC" else "right")
    for lv in run.levels:
        for name, summ in (("TTFT", lv.ttft), ("ITL", lv.itl), ("E2E", lv.e2e)):
            lt.add_row(str(lv.concurrency), name,
                       *(_ms(getattr(summ, q)) if summ else "-"
                         for q in ("mean", "median", "p95", "p99")))
    c.print(lt)
    for lv in run.levels:
        for err in lv.error_samples:
            c.print(f"concurrency {lv.concurrency} error: {err}", highlight=False, markup=False)
    counted = {lv.tokens_counted_from for lv in run.levels}
    if "chunks" in counted or "mixed" in counted:
        c.print("output tokens counted as streamed chunks (the server sent no usage)",
                highlight=False)
