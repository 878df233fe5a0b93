"""Commands for measurement: bench (run), bench compare, bench history, bench serve."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from sovctl.cli import _common
from sovctl.cli._common import STATE, JsonOpt, begin, emit, human_bytes, settings
from sovctl.errors import CheckFailed, SovctlError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.bench.history import Comparison, RunSummary
    from sovctl.bench.load import LoadRun
    from sovctl.bench.runner import BenchRun

FORMATS = ("table", "json", "csv", "md")


class _BenchGroup(TyperGroup):
    """`sovctl bench NAME...` is short for `sovctl bench run NAME...`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def group() -> typer.Typer:
    bench = typer.Typer(
        name="bench",
        cls=_BenchGroup,
        help="Measure models and endpoints: throughput, telemetry, energy per token and cost "
        "per million tokens. 'sovctl bench NAME...' is short for 'sovctl bench run NAME...'.",
        rich_markup_mode=None,
    )
    bench.command("run")(run)
    # ignore_unknown_options: a negative position (-1, -2) is a RUN, not an option.
    bench.command("compare", context_settings={"ignore_unknown_options": True})(compare)
    bench.command("history")(history)
    bench.command("serve")(serve)
    return bench


OutputOpt = Annotated[str, typer.Option(
    "-o", "--output", metavar="FORMAT",
    help="table, json (the same document as --json), csv or md.")]


def _format(output: str) -> str:
    if output not in FORMATS:
        raise UsageError(f"-o/--output must be one of {', '.join(FORMATS)}, got {output!r}")
    if output == "json":
        STATE.json = True
    return output


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes an integer or a comma list, got {value!r}",
                         hint=f"e.g. {option} 1,2,4") from None
    if not out:
        raise UsageError(f"{option} is empty")
    return out


@contextmanager
def _progress() -> Iterator[Callable[[str], None] | None]:
    """A one-line status on stderr for a person at a terminal; nothing otherwise."""
    if STATE.json or not sys.stderr.isatty():
        yield None
        return
    with _common._stderr_console().status("starting") as status:
        yield lambda msg: status.update(msg)


def _write_flat(fmt: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([cell(v) for v in r])
    else:
        sys.stdout.write("| " + " | ".join(columns) + " |\n")
        sys.stdout.write("|" + "|".join("---" for _ in columns) + "|\n")
        for r in rows:
            sys.stdout.write("| " + " | ".join(cell(v).replace("|", "\\|") for v in r) + " |\n")
    sys.stdout.flush()


def _show(data: Any, fmt: str, render: Callable[[Console], None],
          flat: Callable[[], tuple[Sequence[str], Sequence[Sequence[Any]]]],
          failure: SovctlError | None = None) -> None:
    if fmt in ("csv", "md") and not STATE.json:
        columns, rows = flat()
        _write_flat(fmt, columns, rows)
        if failure is not None:
            raise failure
        return
    emit(data, render, failure)


# ---------------------------------------------------------------------------------------------
# sovctl bench run


def run(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(
        metavar="NAME", help="Store names [default: every chat or completion model in "
        "the store].", show_default=False)] = None,
    n_prompt: Annotated[int, typer.Option(
        "-p", "--n-prompt", help="Prompt tokens per pp run; 0 skips pp.")] = 512,
    n_gen: Annotated[int, typer.Option(
        "-n", "--n-gen", help="Tokens generated per tg run; 0 skips tg.")] = 128,
    reps: Annotated[int, typer.Option(
        "-r", "--repetitions", help="Timed runs of each phase, after one warm-up.")] = 5,
    threads: Annotated[str | None, typer.Option(
        "-t", "--threads", metavar="N[,N...]",
        help="CPU threads, or a comma list to sweep [default: physical cores].",
        show_default=False)] = None,
    gpu_layers: Annotated[str | None, typer.Option(
        "-ngl", "--gpu-layers", metavar="N[,N...]",
        help="Layers offloaded to the GPU (-1 = all), or a comma list [default: -1 where "
        "llama.cpp can offload, else 0].", show_default=False)] = None,
    batch: Annotated[str, typer.Option(
        "-b", "--batch-size", metavar="N[,N...]",
        help="Logical batch size, or a comma list to sweep.")] = "2048",
    ubatch: Annotated[int, typer.Option(
        "-ub", "--ubatch-size", help="Physical batch size.")] = 512,
    flash_attn: Annotated[bool, typer.Option(
        "-fa", "--flash-attn", help="Use flash attention.")] = False,
    repack: Annotated[bool, typer.Option(
        "--repack/--no-repack", help="Let llama.cpp repack weights for this CPU (AMX, "
        "AVX interleaved); --no-repack where that crashes.")] = True,
    output: OutputOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """Benchmark prompt processing and generation as llama-bench does, with telemetry,
    energy per token, cost per million tokens and the memory-bandwidth roofline. Every run
    is appended to the history."""
    from sovctl.bench import runner

    state = begin(ctx, json_out)
    fmt = _format(output)
    sweep = runner.Sweep(
        n_prompt=n_prompt, n_gen=n_gen, reps=reps,
        threads=_ints(threads, "-t") if threads else (runner.default_threads(),),
        gpu_layers=_ints(gpu_layers, "-ngl") if gpu_layers else (runner.default_gpu_layers(),),
        batch=_ints(batch, "-b"), ubatch=ubatch, flash_attn=flash_attn, repack=repack,
    )
    cfg = settings()
    with _progress() as progress:
        result = runner.run(state.home, names or [], sweep, cfg, progress,
                            verbose=state.verbose > 0)
    _show(result, fmt, lambda c: _render_run(c, result), lambda: _run_rows(result))


def _params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _money(v: float, currency: str) -> str:
    return f"{v:.4f} {currency}" if v < 1 else f"{v:.2f} {currency}"


_RUN_COLUMNS = (
    "run_id", "model", "sha256", "weights_bytes", "parameters", "backend", "threads",
    "n_gpu_layers", "batch", "ubatch", "flash_attn", "repack", "test", "tokens", "reps",
    "tokens_per_s", "tokens_per_s_sd", "joules_per_token", "tokens_per_joule", "wh_per_mtok",
    "electricity_per_mtok", "hardware_per_mtok", "local_per_mtok", "cloud_per_mtok",
    "currency", "energy_estimated", "energy_method", "energy_scope", "process_cpu_pct",
    "rss_max_bytes", "gpu_util_mean_pct", "gpu_power_mean_w", "gpu_temp_max_c",
    "throttle_reasons", "roofline_fraction", "peak_bandwidth_gbs", "peak_bandwidth_source",
)


def _run_rows(run: BenchRun) -> tuple[Sequence[str], list[list[Any]]]:
    rows = []
    for r in run.results:
        for p in (r.pp, r.tg):
            if p is None:
                continue
            s, tel, c = r.settings, p.telemetry, p.costs
            gpus = tel.gpus
            roof = r.roofline if p is r.tg else None
            rows.append([
                run.id, r.model.name, r.model.sha256, r.model.weights_bytes,
                r.model.parameters, "GPU" if r.on_gpu else "CPU", s.threads, s.n_gpu_layers,
                s.batch, s.ubatch, s.flash_attn, s.repack, p.test, p.tokens, p.reps,
                p.tps_mean, p.tps_sd, c.joules_per_token, c.tokens_per_joule, c.wh_per_mtok,
                c.electricity_per_mtok, c.hardware_per_mtok, c.local_per_mtok, c.cloud_per_mtok,
                c.currency, c.estimated, tel.energy_method, tel.energy_scope,
                tel.process_cpu_pct, tel.rss_max_bytes,
                _avg([g.util_mean_pct for g in gpus]), _sum([g.power_mean_w for g in gpus]),
                _max([g.temperature_max_c for g in gpus]),
                ";".join(sorted({t for g in gpus for t in g.throttle_reasons})),
                roof.fraction if roof else None,
                roof.peak_bytes_per_s / 1e9 if roof else None,
                roof.peak_source if roof else None,
            ])
    return _RUN_COLUMNS, rows


def _avg(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _sum(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) if v else None


def _max(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return max(v) if v else None


_ENERGY_SOURCE = {"nvml-energy-counter": "nvml counter", "nvml-power-integrated": "nvml power",
                  "estimate-cpu-watts": "cpu_watts"}


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _render_run(c: Console, run: BenchRun) -> None:
    from rich.table import Table

    from sovctl.bench.history import settings_label

    est = "*"
    seen: set[str] = set()
    for r in run.results:
        m = r.model
        if m.name not in seen:
            seen.add(m.name)
            c.print(f"{m.name}: {m.description}, {human_bytes(m.weights_bytes)} of weights, "
                    f"{_params(m.parameters)} parameters, sha256 {m.sha256[:12]}",
                    highlight=False)
    phases = [(r, p) for r in run.results for p in (r.pp, r.tg) if p]

    t = Table(title="throughput", box=None, pad_edge=False, title_justify="left")
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
    e = Table(title="energy", box=None, pad_edge=False, title_justify="left")
    for col in ("MODEL", "TEST", "SOURCE", "POWER", "ENERGY", "J/TOKEN", "TOKENS/J",
                "WH/MTOK"):
        e.add_column(col, no_wrap=True, justify="left" if col in ("MODEL", "TEST", "SOURCE")
                     else "right")
    for r, p in phases:
        k, tel = p.costs, p.telemetry
        mark = est if k.estimated else ""
        e.add_row(r.model.name, p.test, _ENERGY_SOURCE.get(tel.energy_method, tel.energy_method),
                  f"{tel.power_mean_w:.1f} W{mark}", f"{tel.energy_j:.3g} J{mark}",
                  f"{k.joules_per_token:.3g}{mark}", f"{k.tokens_per_joule:.3g}{mark}",
                  f"{k.wh_per_mtok:.3g}{mark}")
    c.print(e)
    c.print()

    ct = Table(title=f"cost per million tokens ({currency})", box=None, pad_edge=False,
               title_justify="left")
    for col in ("MODEL", "TEST", "ELECTRICITY", "HARDWARE", "LOCAL TOTAL", "CLOUD"):
        ct.add_column(col, no_wrap=True, justify="left" if col in ("MODEL", "TEST") else "right")
    for r, p in phases:
        k = p.costs
        mark = est if k.estimated else ""
        ct.add_row(r.model.name, p.test, f"{k.electricity_per_mtok:.3g}{mark}",
                   f"{k.hardware_per_mtok:.3g}", f"{k.local_per_mtok:.3g}{mark}",
                   f"{k.cloud_per_mtok:.3g}")
    c.print(ct)
    c.print()

    tt = Table(title="telemetry", box=None, pad_edge=False, title_justify="left")
    for col in ("MODEL", "TEST", "SAMPLES", "CPU %", "SYSTEM CPU %", "PEAK RSS"):
        tt.add_column(col, no_wrap=True)
    for r, p in phases:
        tel = p.telemetry
        tt.add_row(r.model.name, p.test, str(tel.samples), f"{tel.process_cpu_pct:.0f}",
                   f"{tel.system_cpu_pct:.0f}", human_bytes(tel.rss_max_bytes))
    c.print(tt)
    c.print()

    if any(p.telemetry.gpus for _, p in phases):
        gt = Table(title="GPU telemetry (NVML)", box=None, pad_edge=False, title_justify="left")
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

    for r in run.results:
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
    if run.estimated:
        watts = run.config["bench.cpu_watts"]["value"]
        c.print(f"* estimated: no power meter here, so energy = bench.cpu_watts ({watts:g} W) "
                "x phase time; every figure built on it is an estimate", highlight=False)
    if any(p.telemetry.energy_scope == "gpu" for _, p in phases):
        c.print("GPU energy is measured by NVML for the GPU boards only; the host is not "
                "included", highlight=False)
    if not run.config["cost.hardware_price"]["value"]:
        c.print("hardware cost is 0: set cost.hardware_price in sovctl.toml to amortise the box",
                highlight=False)
    c.print(f"recorded as run {run.id} in {run.history}; compare with 'sovctl bench compare'",
            highlight=False)


# ---------------------------------------------------------------------------------------------
# sovctl bench compare


def compare(
    ctx: typer.Context,
    run_ref: Annotated[str | None, typer.Argument(
        metavar="RUN", help="Run id, unique id prefix, or -1 (latest), -2, ... "
        "[default: the latest run].", show_default=False)] = None,
    against: Annotated[str | None, typer.Option(
        "--against", help="The run to compare with [default: the previous run of the same "
        "model and settings].", show_default=False)] = None,
    fail_on_slower: Annotated[bool, typer.Option(
        "--fail-on-slower", help="Exit 1 when any phase got slower beyond the spread.")]
    = False,
    output: OutputOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """Compare a run with an earlier one; flag changes beyond the runs' own spread."""
    from sovctl.bench import history as hist

    state = begin(ctx, json_out)
    fmt = _format(output)
    result = hist.compare(hist.load(state.home), run_ref, against)
    failure = None
    if fail_on_slower and result.slower:
        failure = CheckFailed(
            f"{len(result.slower)} phase(s) slower than run {result.against} beyond the spread",
            hint="see the table; environment changes are listed below it")
    _show(result, fmt, lambda c: _render_compare(c, result), lambda: _compare_rows(result),
          failure)


def _compare_rows(cmp: Comparison) -> tuple[Sequence[str], list[list[Any]]]:
    from sovctl.bench.history import settings_label

    cols = ("run", "against", "model", "test", "settings", "tokens_per_s", "sd",
            "against_tokens_per_s", "against_sd", "delta_pct", "threshold", "verdict",
            "joules_per_token", "against_joules_per_token")
    rows = [[cmp.run, cmp.against, x.model, x.test, settings_label(x.settings), x.mean, x.sd,
             x.against_mean, x.against_sd, x.delta_pct, x.threshold, x.verdict,
             x.joules_per_token, x.against_joules_per_token] for x in cmp.changes]
    return cols, rows


def _render_compare(c: Console, cmp: Comparison) -> None:
    from rich.table import Table

    from sovctl.bench.history import settings_label

    c.print(f"run {cmp.run} ({cmp.run_started_at}) against {cmp.against} "
            f"({cmp.against_started_at})", highlight=False)
    t = Table(box=None, pad_edge=False)
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


# ---------------------------------------------------------------------------------------------
# sovctl bench history


def history(
    ctx: typer.Context,
    output: OutputOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """List the recorded benchmark runs, oldest first."""
    from sovctl.bench import history as hist

    state = begin(ctx, json_out)
    fmt = _format(output)
    rows = hist.summaries(hist.load(state.home))
    _show(rows, fmt, lambda c: _render_history(c, rows), lambda: _history_rows(rows))


def _history_rows(rows: list[RunSummary]) -> tuple[Sequence[str], list[list[Any]]]:
    return (("id", "started_at", "models", "results", "environment"),
            [[r.id, r.started_at, " ".join(r.models), r.results, r.fingerprint] for r in rows])


def _render_history(c: Console, rows: list[RunSummary]) -> None:
    from rich.table import Table

    if not rows:
        c.print("no runs yet: 'sovctl bench NAME' records one")
        return
    t = Table(box=None, pad_edge=False)
    for col in ("ID", "STARTED", "MODELS", "RESULTS", "ENVIRONMENT"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.id, r.started_at, ", ".join(r.models), str(r.results), r.fingerprint)
    c.print(t)


# ---------------------------------------------------------------------------------------------
# sovctl bench serve


def serve(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(
        "--url", help="OpenAI-compatible base URL [default: the gateway, "
        "http://SERVE_HOST:SERVE_PORT/v1 from the config].", show_default=False)] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="SOVCTL_API_KEY", help="Bearer key [default: the gateway's key "
        "under the home, if there is one].", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Model to request [default: the first one GET /models lists].",
        show_default=False)] = None,
    concurrency: Annotated[str, typer.Option(
        "-c", "--concurrency", metavar="N[,N...]",
        help="Concurrent clients per level, a comma list.")] = "1,4,8",
    requests: Annotated[int, typer.Option(
        "--requests", help="Requests sent at each level.")] = 32,
    prompt_tokens: Annotated[int, typer.Option(
        "--prompt-tokens", help="Approximate prompt length in tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Output tokens asked for per request.")] = 128,
    endpoint: Annotated[str, typer.Option(
        "--endpoint", help="chat (/chat/completions) or completions (/completions).")]
    = "chat",
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos", help="Ask the server to generate all --max-tokens (llama.cpp and "
        "vLLM honour it; OpenAI rejects it).")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Seconds one request may take.")] = 300.0,
    warmup: Annotated[bool, typer.Option(
        "--warmup/--no-warmup", help="Send one uncounted request first.")] = True,
    output: OutputOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """Load an OpenAI-compatible endpoint with streaming requests at each concurrency level:
    TTFT, inter-token and end-to-end latency (mean, median, p95, p99), tokens/s, requests/s
    and errors."""
    from sovctl.bench import load
    from sovctl.secrets import read_api_key

    state = begin(ctx, json_out)
    fmt = _format(output)
    cfg = settings()
    if url is None:
        url = f"http://{cfg.get('serve.host')}:{cfg.get('serve.port')}/v1"
    s = load.LoadSettings(
        url=url, model=model, concurrency=_ints(concurrency, "--concurrency"),
        requests=requests, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        endpoint=endpoint, timeout=timeout, ignore_eos=ignore_eos, warmup=warmup,
    )
    key = api_key if api_key is not None else read_api_key(state.home)
    with _progress() as progress:
        result = load.run(s, key, progress)
    failure = None
    if result.levels and all(level.completed == 0 for level in result.levels):
        failure = CheckFailed(f"every request to {url} failed",
                              hint=f"first error: {result.levels[0].error_samples[0]}")
    _show(result, fmt, lambda c: _render_serve(c, result), lambda: _serve_rows(result), failure)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _serve_rows(run: LoadRun) -> tuple[Sequence[str], list[list[Any]]]:
    cols = ["url", "model", "concurrency", "requests", "completed", "errors", "wall_s",
            "requests_per_s", "output_tokens", "output_tokens_per_s", "tokens_counted_from"]
    for m in ("ttft", "itl", "e2e"):
        cols += [f"{m}_{q}_ms" for q in ("mean", "median", "p95", "p99")]
    rows = []
    for lv in run.levels:
        row: list[Any] = [run.url, run.model, lv.concurrency, lv.requests, lv.completed,
                          lv.errors, lv.wall_s, lv.requests_per_s, lv.output_tokens,
                          lv.output_tokens_per_s, lv.tokens_counted_from]
        for summ in (lv.ttft, lv.itl, lv.e2e):
            row += ([summ.mean * 1000, summ.median * 1000, summ.p95 * 1000, summ.p99 * 1000]
                    if summ else [None] * 4)
        rows.append(row)
    return cols, rows


def _render_serve(c: Console, run: LoadRun) -> None:
    from rich.table import Table

    c.print(f"{run.url} model {run.model}: {run.settings.requests} requests per level, "
            f"~{run.settings.prompt_tokens} prompt tokens, up to {run.settings.max_tokens} "
            f"output tokens, streaming", highlight=False)
    t = Table(title="throughput", box=None, pad_edge=False, title_justify="left")
    for col in ("CONCURRENCY", "OK", "ERRORS", "REQ/S", "OUTPUT TOK/S", "TOKENS", "WALL S"):
        t.add_column(col, justify="right")
    for lv in run.levels:
        t.add_row(str(lv.concurrency), str(lv.completed),
                  f"[red]{lv.errors}[/]" if lv.errors else "0", f"{lv.requests_per_s:.2f}",
                  f"{lv.output_tokens_per_s:.1f}", str(lv.output_tokens), f"{lv.wall_s:.2f}")
    c.print(t)
    c.print()
    lt = Table(title="latency (ms)", box=None, pad_edge=False, title_justify="left")
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
