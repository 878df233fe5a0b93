"""Commands for measurement: bench (run), bench compare, bench history, bench serve.

Each parses its options, calls sovctl.bench and shows the result: tables from bench_render,
csv and md from the core's named rows through _output, json as the versioned envelope.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from sovctl.cli import _common
from sovctl.cli._common import STATE, JsonOpt, begin, settings
from sovctl.cli._output import OutputOpt, choose, show
from sovctl.errors import CheckFailed, UsageError


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
    from sovctl.cli import bench_render

    state = begin(ctx, json_out)
    fmt = choose(output)
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
    show(fmt, result, lambda c: bench_render.run(c, result), runner.PhaseRow, result.rows)


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
    from sovctl.cli import bench_render

    state = begin(ctx, json_out)
    fmt = choose(output)
    result = hist.compare(hist.load(state.home), run_ref, against)
    failure = None
    if fail_on_slower and result.slower:
        failure = CheckFailed(
            f"{len(result.slower)} phase(s) slower than run {result.against} beyond the spread",
            hint="see the table; environment changes are listed below it")
    show(fmt, result, lambda c: bench_render.compare(c, result), hist.ChangeRow, result.rows,
         failure)


# ---------------------------------------------------------------------------------------------
# sovctl bench history


def history(
    ctx: typer.Context,
    output: OutputOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """List the recorded benchmark runs, oldest first."""
    from sovctl.bench import history as hist
    from sovctl.cli import bench_render

    state = begin(ctx, json_out)
    fmt = choose(output)
    rows = hist.summaries(hist.load(state.home))
    show(fmt, rows, lambda c: bench_render.history(c, rows), hist.SummaryRow,
         lambda: [r.row() for r in rows])


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
    from sovctl.apikey import read_api_key
    from sovctl.bench import load
    from sovctl.cli import bench_render

    state = begin(ctx, json_out)
    fmt = choose(output)
    cfg = settings()
    if url is None:
        url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
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
    show(fmt, result, lambda c: bench_render.serve(c, result), load.LevelRow, result.rows,
         failure)
