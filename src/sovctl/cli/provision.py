"""Commands from bare hardware to a running stack: doctor, profiles, init, plan, up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit, human_bytes, human_params, settings

if TYPE_CHECKING:

    from rich.console import Console

    from sovctl.provision.planning import ClusterPlan
    from sovctl.sizing import Budget, Fit

ProfileOpt = Annotated[str, typer.Option(
    "--profile", metavar="NAME|auto",
    help="Profile to write into sovctl.toml; auto picks the best fit for this machine.")]
RamOpt = Annotated[str | None, typer.Option(
    "--ram", metavar="SIZE", help="Plan with this much RAM instead of what is available now "
    "(e.g. 16GiB, 512MB).", show_default=False)]
VramOpt = Annotated[str | None, typer.Option(
    "--vram", metavar="SIZE", help="Plan with this much free GPU memory instead of what NVML "
    "reports (0: no GPU).", show_default=False)]
EndpointOpt = Annotated[str | None, typer.Option(
    "--endpoint", metavar="URL", help="Hugging Face compatible endpoint [env: "
    "SOVCTL_HUB__ENDPOINT, HF_ENDPOINT; default: https://huggingface.co].", show_default=False)]

_STATUS = {"ok": "green", "warn": "yellow", "fail": "red", "info": "cyan"}



def _size(value: str | None) -> int | None:
    from sovctl.units import parse_size

    return None if value is None else parse_size(value)


def doctor(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Check this machine for a stack: CPU, RAM, disk, GPUs, llama.cpp, namespaces, ports, lock.
    Exit 1 only when something needed is broken."""
    from sovctl.errors import CheckFailed
    from sovctl.provision.doctor import doctor as run_doctor

    state = begin(ctx, json_out)
    report = run_doctor(state.home)
    f = report.facts

    def render(c: Console) -> None:
        from rich.table import Table

        c.print(f"[bold]CPU[/]     {f.cpu_model}: {f.physical_cores} cores, "
                f"{f.logical_cores} threads", highlight=False)
        c.print(f"[bold]RAM[/]     {human_bytes(f.ram_total)} ({human_bytes(f.ram_available)} "
                "available)", highlight=False)
        gpus = "; ".join(f"{g.index}: {g.name} {human_bytes(g.memory_total)}" for g in f.gpus)
        c.print(f"[bold]GPU[/]     {gpus or 'none'}"
                + (f" (driver {f.driver_version}, CUDA {f.cuda_version})" if f.gpus else ""),
                highlight=False)
        c.print(f"[bold]OS[/]      {f.os}, Python {f.python}", highlight=False)
        t = Table(box=None, pad_edge=False, show_header=True)
        for col in ("", "CHECK", "DETAIL", "FIX"):
            t.add_column(col, overflow="fold")
        for ch in report.checks:
            t.add_row(f"[{_STATUS[ch.status]}]{ch.status}[/]", ch.name, ch.detail, ch.fix or "")
        c.print(t)
        if report.profile:
            c.print(f"profile for this machine: [bold]{report.profile}[/] "
                    f"({'; '.join(report.profile_reasons)}); sovctl init writes it",
                    highlight=False)

    failure = None
    if not report.ok:
        names = ", ".join(ch.name for ch in report.failed)
        failure = CheckFailed(f"{len(report.failed)} check(s) failed: {names}",
                              hint=report.failed[0].fix)
    emit(report, render, failure)


def profiles(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the hardware profiles, what each serves, and whether it fits this machine."""
    from sovctl.provision.facts import detect
    from sovctl.provision.profiles import assess_all

    state = begin(ctx, json_out)
    fits = assess_all(state.home, detect(state.home))

    def render(c: Console) -> None:
        for x in fits:
            p = x.profile
            mark = "[green]fits[/]" if x.fits else "[dim]does not fit[/]"
            chosen = " [bold green](chosen by init)[/]" if x.chosen else ""
            c.print(f"[bold]{p.name}[/]  {p.summary or '(no [hardware] section)'}  "
                    f"{mark}{chosen}", highlight=False)
            c.print(f"  why: {'; '.join(x.reasons)}", highlight=False)
            gpu = ("every layer on the GPU" if p.n_gpu_layers < 0
                   else f"{p.n_gpu_layers} GPU layers" if p.n_gpu_layers else "CPU only")
            c.print(f"  serve: {p.runtime}, {p.parallel} slots x {p.n_ctx} tokens, {gpu}",
                    highlight=False)
            for m in p.models:
                c.print(f"  {m.role:9} {m.name}: {m.ref}@{m.revision}", highlight=False)
            if not p.shipped:
                c.print(f"  from {p.path}", highlight=False)

    emit(fits, render)


def init(
    ctx: typer.Context,
    profile: ProfileOpt = "auto",
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing sovctl.toml (kept as sovctl.toml.bak).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write sovctl.toml from the profile that fits this machine, and say why."""
    from sovctl.provision.init import init as do_init

    state = begin(ctx, json_out)
    result = do_init(state.home, profile, force=force)

    def render(c: Console) -> None:
        how = "chosen for this machine" if result.auto else "as asked"
        c.print(f"wrote {result.path}: profile [bold]{result.profile}[/] ({how}): "
                f"{result.summary}", highlight=False)
        for r in result.reasons:
            c.print(f"  - {r}", highlight=False)
        if not result.fits:
            c.print("[yellow]note:[/] this profile does not fit this machine (see above); "
                    "'sovctl plan NAME' shows what would", highlight=False)
        for m in result.models:
            c.print(f"  {m.role:9} {m.name}: {m.ref}@{m.revision}", highlight=False)
        if result.backup:
            c.print(f"the old file is kept as {result.backup}", highlight=False)
        c.print("next: sovctl up (pulls these models, checks they fit, and serves them)")

    emit(result, render)


def _fit_lines(c: Console, f: Fit, budget: Budget) -> None:
    from sovctl.units import human_bytes as human

    fp = f.footprint
    c.print(f"  fit        {f.parallel} slot(s) x {f.n_ctx} tokens, {f.where} "
            f"(n_gpu_layers {f.n_gpu_layers})", highlight=False)
    c.print(f"  RAM        {human(fp.ram_bytes)} = weights {human(fp.weights_ram)} + KV "
            f"{human(fp.kv_ram)} + compute {human(fp.compute_ram)} + runtime "
            f"{human(fp.overhead_ram)}; usable {human(max(f.ram_usable, 0))} "
            f"({budget.ram_source})", highlight=False, markup=False)
    if fp.vram_bytes or budget.vram_usable > 0:
        c.print(f"  VRAM       {human(fp.vram_bytes)} = weights {human(fp.weights_vram)} + KV "
                f"{human(fp.kv_vram)} + compute {human(fp.compute_vram)} + CUDA "
                f"{human(fp.overhead_vram)}; usable {human(f.vram_usable)} "
                f"({budget.vram_source})", highlight=False, markup=False)
    for n in f.notes:
        c.print(f"  [yellow]note:[/] {n}", highlight=False)


def _cluster_lines(c: Console, cp: ClusterPlan) -> None:
    from rich.table import Table

    from sovctl.sizing import layer_range
    from sovctl.units import human_bytes as human

    f, sp = cp.fit, cp.fit.split
    c.print(f"  cluster    {sp.parallel} slot(s) x {sp.n_ctx} tokens, {sp.offloaded}/"
            f"{sp.n_layer + 1} layers over {len(sp.devices)} device(s), split by free memory "
            f"({len(cp.workers) - len(cp.lost)} of {len(cp.workers)} worker(s))", highlight=False)
    # One space between columns: an 80-column terminal then holds a row without folding it.
    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("  DEVICE", "LAYERS", "WEIGHTS", "KV", "COMPUTE", "TOTAL", "USABLE", "FITS"):
        text = col in ("  DEVICE", "LAYERS")
        t.add_column(col, justify="left" if text else "right", no_wrap=not text,
                     overflow="fold")
    for d in (*sp.devices, sp.head):
        layers = layer_range(d.layers, sp.n_layer)
        if d is sp.head:
            layers = "in" + (f"+{layers}" if d.layers else "")
        t.add_row(f"  {d.label}", layers, human(d.weights), human(d.kv), human(d.compute),
                  human(d.total), human(max(d.usable, 0)),
                  "[green]yes[/]" if d.fits else "[red]no[/]")
    c.print(t)
    runtime = [f"{human(d.overhead)} on {d.label}" for d in (*sp.devices, sp.head) if d.overhead]
    c.print(f"  TOTAL includes the runtime's own memory: {', '.join(runtime)}", highlight=False)
    for n in f.notes:
        c.print(f"  [yellow]note:[/] {n}", highlight=False)
    for h in cp.lost:
        c.print(f"  [yellow]lost:[/] {h.endpoint} ({h.reason}): left out of the split, as serve "
                f"would start without it (--worker-memory {h.endpoint}=SIZE plans with it)",
                highlight=False)
    if f.fits:
        c.print(f"  [green]fits[/]: serve with n_ctx = {sp.n_ctx}, parallel = {sp.parallel} "
                "over the cluster", highlight=False)


def plan(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(
        metavar="NAME|REF", help="A pinned name, a [pull.NAME] not fetched yet, or any REF "
        "pull takes (a path, hf://ORG/REPO/FILE.gguf, ORG/REPO:QUANT); from the Hub only the "
        "header is read.")],
    n_ctx: Annotated[int | None, typer.Option(
        "--ctx", metavar="N", min=1, help="Tokens per request [default: n_ctx of the model's "
        "section or [serve]].", show_default=False)] = None,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", metavar="N", min=1, help="Parallel slots, each with its own KV cache "
        "[default: from the config].", show_default=False)] = None,
    gpu_layers: Annotated[int | None, typer.Option(
        "--gpu-layers", metavar="N", min=-1, help="At most this many layers on the GPU (-1: "
        "all that fit, 0: none) [default: from the config].", show_default=False)] = None,
    ram: RamOpt = None,
    vram: VramOpt = None,
    worker_memory: Annotated[list[str] | None, typer.Option(
        "--worker-memory", metavar="ENDPOINT=SIZE", help="Split the [cluster] model with this "
        "much free memory on that worker instead of asking it (repeatable).",
        show_default=False)] = None,
    revision: Annotated[str | None, typer.Option(
        "--revision", metavar="REV", help="Branch, tag or commit of a Hub REF [default: main].",
        show_default=False)] = None,
    endpoint: EndpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Estimate a model's memory and the GPU layers, context and slots that fit this machine,
    before downloading it; for the [cluster] model, its split over the workers. Exit 1 when it
    cannot fit."""
    import os

    from sovctl.provision.facts import detect
    from sovctl.provision.planning import DoesNotFit, parse_worker_memory
    from sovctl.provision.planning import plan as do_plan
    from sovctl.sizing import cluster_refusal, refusal
    from sovctl.units import human_bytes as human

    state = begin(ctx, json_out)
    cfg = settings({"hub.endpoint": endpoint})
    facts = detect(state.home, cfg.serve.llama_server)
    result = do_plan(state.home, cfg, target, facts, ram=_size(ram), vram=_size(vram),
                     n_ctx=n_ctx, parallel=parallel, gpu_layers=gpu_layers,
                     revision=revision, token=os.environ.get("HF_TOKEN"),
                     worker_memory=parse_worker_memory(worker_memory or []))
    f, t, s, cp = result.fit, result.target, result.fit.shape, result.cluster

    def render(c: Console) -> None:
        where = {"store": "the store", "pull": "its [pull] ref", "file": "a local file",
                 "hub": "the Hub", "url": "a URL"}[t.origin]
        how = (f"header only: {human_bytes(t.fetched_bytes)} in {t.requests} range "
               f"request(s) of a {human_bytes(t.file_size)} file" if t.requests
               else f"{human_bytes(t.file_size)} file")
        c.print(f"[bold]{t.name}[/] from {where} ({how})", highlight=False)
        c.print(f"  model      {s.architecture}, {human_params(s.parameters)} parameters, "
                f"{s.n_layer} layers, trained context {s.context_length or '?'}, "
                f"{f.role}", highlight=False)
        c.print(f"  weights    {human(s.weights_bytes)}; KV cache {human(s.kv_bytes_per_token)}"
                " per token (f16)", highlight=False)
        if cp is not None:  # served over the cluster: this machine alone is beside the point
            _cluster_lines(c, cp)
            return
        _fit_lines(c, f, result.budget)
        if f.fits:
            c.print(f"  [green]fits[/]: serve with n_ctx = {f.n_ctx}, parallel = {f.parallel}, "
                    f"n_gpu_layers = {f.n_gpu_layers}", highlight=False)

    failure = None
    if cp is not None and not cp.fit.fits:
        failure = DoesNotFit(cluster_refusal(cp.fit, result.budget.headroom),
                             hint="fewer --parallel slots or a smaller --ctx, a smaller "
                             "quantization or model, or more workers or memory")
    elif cp is None and not f.fits:
        failure = DoesNotFit(refusal(f, result.budget),
                             hint="a smaller quantization or model, fewer --parallel slots or "
                             "a smaller --ctx, or more memory")
    emit(result, render, failure)


def up(
    ctx: typer.Context,
    profile: Annotated[str, typer.Option(
        "--profile", metavar="NAME|auto",
        help="Profile for the sovctl.toml written when there is none yet; auto picks the best "
        "fit for this machine.")] = "auto",
    ram: RamOpt = None,
    vram: VramOpt = None,
    endpoint: EndpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Init, pull, plan and serve in one step; wait until the stack is ready, then show how to
    call it. Run again: it reports the stack already up, or continues where it stopped."""
    import os

    from sovctl.cli._progress import bars
    from sovctl.ops.up import up as do_up

    state = begin(ctx, json_out)
    with bars() as progress:
        result = do_up(state.home, profile=profile, ram=_size(ram), vram=_size(vram),
                       endpoint=endpoint, token=os.environ.get("HF_TOKEN"), progress=progress)

    def render(c: Console) -> None:
        if result.already_running:
            c.print(f"the stack is already up at [bold]{result.url}[/]", highlight=False)
        else:
            if result.initialised:
                i = result.initialised
                c.print(f"wrote {i.path}: profile [bold]{i.profile}[/] "
                        f"({'; '.join(i.reasons)})", highlight=False)
            for p in result.pulled:
                c.print(f"{p.action:14} {p.name} (sha256 {p.sha256[:12]}, "
                        f"{human_bytes(p.size)})", highlight=False)
            for f in result.fits:
                c.print(f"{f.model}: {f.role}, {f.parallel} slot(s) x {f.n_ctx} tokens, "
                        f"{f.where}", highlight=False)
            for n in result.notes:
                c.print(f"[yellow]note:[/] {n}", highlight=False)
            c.print(f"stack up and ready at [bold]{result.url}[/]", highlight=False)
        if result.api_key_file:
            c.print(f"API key: {result.api_key_file}"
                    + (" (new)" if result.api_key_created else ""), highlight=False)
        c.print("\ntry it:\n" + result.examples.curl, highlight=False, markup=False)
        c.print("\nor with the openai client:\n" + result.examples.python, highlight=False,
                markup=False)
        c.print("\nsovctl status shows it; sovctl stop stops it.")

    emit(result, render)
