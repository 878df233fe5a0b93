"""Commands for the runtime: serve, status, stop, logs, service install."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sovctl.cli import _common
from sovctl.cli._common import STATE, DetachOpt, JsonOpt, begin, emit, settings

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from rich.console import Console

    from sovctl.runtime.documents import MemoryBudget, ProcessState, StackState, Status

ChatOpt = Annotated[list[str] | None, typer.Option(
    "--chat", help="Store name of a chat model to serve (repeatable).")]
EmbedOpt = Annotated[list[str] | None, typer.Option(
    "--embedding", help="Store name of an embedding model to serve (repeatable).")]
RerankOpt = Annotated[list[str] | None, typer.Option(
    "--rerank", help="Store name of a reranker to serve on /v1/rerank (repeatable).")]
HostOpt = Annotated[str | None, typer.Option(
    help="Gateway address (default 127.0.0.1; anything else requires the API key).")]
PortOpt = Annotated[int | None, typer.Option(help="Gateway port (default 8088).")]


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("status")(status)
    app.command("stop")(stop)
    app.command("logs")(logs)
    service = typer.Typer(help="Run the stack as a systemd service.", no_args_is_help=True)
    service.command("install")(service_install)
    app.add_typer(service, name="service")


def serve(
    ctx: typer.Context,
    chat: ChatOpt = None,
    embedding: EmbedOpt = None,
    rerank: RerankOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    detach: DetachOpt = False,
    verify: Annotated[bool, typer.Option("--verify",
                                         help="Re-hash every served blob before starting.")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run",
                                          help="Print each process's argv and environment; "
                                          "start nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Serve the configured models behind one OpenAI-compatible gateway, supervised."""
    from sovctl.ops import stack
    from sovctl.runtime import control
    from sovctl.runtime.plan import build

    state = begin(ctx, json_out)
    home = state.home
    cfg = settings({"serve.host": host, "serve.port": port})
    plan = build(home, cfg, chat or [], embedding or [], rerank=rerank or [])
    if dry_run:
        procs = [{"name": p.name, "kind": p.kind, "runtime": p.runtime,
                  "argv": list(p.argv.args), "env": dict(p.argv.env), "port": p.port}
                 for p in plan.processes]

        def render_dry(c: Console) -> None:
            _notes(c, plan.notes)
            for p in plan.processes:
                what = f"{p.kind}, {p.runtime}" if p.runtime else p.kind
                c.print(f"[bold]{p.name}[/] ({what}, port {p.port})")
                c.print("  " + str(p.argv), highlight=False, soft_wrap=True)
            if plan.api_key_required:
                c.print(f"the gateway would require the API key ({home.secrets / 'api_key'})")

        emit({"url": plan.url, "processes": procs, "notes": plan.notes,
              "api_key_required": plan.api_key_required}, render_dry)
        return
    # The one start sequence: detached, admit then a supervisor; in the foreground, admit here
    # and run the plan in this process below.
    if detach:
        admitted, st = stack.start(home, plan, full_verify=verify)
    else:
        admitted = stack.admit(home, plan, full_verify=verify)
    checks = list(admitted.weights)
    key_note = ""
    # In the JSON document too: it is shown once, either way.
    new_key = admitted.api_key if admitted.api_key_created else None
    if admitted.api_key_file is not None:
        key_note = (f"API key (shown once; read it again with: cat {admitted.api_key_file}): "
                    f"{new_key}" if new_key else f"API key required: cat {admitted.api_key_file}")
    if detach:
        def render_detached(c: Console) -> None:
            _notes(c, plan.notes)
            c.print(f"stack up at [bold]{st.url}[/] (supervisor pid {st.supervisor_pid})")
            _status_table(c, st.processes)
            if key_note:
                c.print(key_note)
            c.print("stop it with: sovctl stop")

        emit({"url": st.url, "supervisor_pid": st.supervisor_pid,
              "processes": _processes_json(st.processes), "weights": checks,
              "notes": plan.notes, "api_key_created": admitted.api_key_created,
              "api_key": new_key}, render_detached)
        return

    from sovctl.runtime.documents import Status

    seen: dict[str, Status] = {}

    def on_change(st: StackState) -> None:
        if STATE.json:
            return
        for p in st.processes:
            if seen.get(p.name) != p.status:
                seen[p.name] = p.status
                why = f" ({p.last_exit})" if p.last_exit and p.status != Status.UP else ""
                _common.console.print(f"{time.strftime('%H:%M:%S')} {p.name}: {p.status}{why}")

    if not STATE.json:
        _notes(_common.err_console, plan.notes)
        names = ", ".join(m.name for m in plan.models)
        _common.console.print(f"serving {names} at [bold]{plan.url}[/] (Ctrl-C stops)")
        if key_note:
            _common.console.print(key_note)
    control.run_foreground(home, plan, on_change)
    emit({"url": plan.url, "stopped": True}, lambda c: c.print("stopped"))


def _notes(c: Console, notes: Sequence[str]) -> None:
    for n in notes:
        c.print(f"[yellow]note:[/] {n}", highlight=False)


def _status_table(c: Console, processes: Sequence[ProcessState],
                  tools: Mapping[str, bool | None] | None = None) -> None:
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("PROCESS", "ROLE", "MODEL", "RUNTIME", "PID", "PORT", "UPTIME", "RESTARTS",
                "HEALTH", *(("TOOLS",) if tools is not None else ())):
        t.add_column(col)
    from sovctl.runtime.documents import Status

    colours = {Status.UP: "green", Status.FAILED: "red", Status.STOPPED: "dim",
               Status.UNLOADED: "blue"}
    now = time.time()
    for p in processes:
        colour = colours.get(p.status, "yellow")
        row = [p.name, p.role or p.kind, p.model or "-", p.runtime or "-",
               str(p.pid or "-"), str(p.port), f"{p.uptime(now):.0f}s", str(p.restarts),
               f"[{colour}]{p.status}[/]"]
        if tools is not None:
            known = tools.get(p.model) if p.kind == "runtime" else None
            row.append("-" if known is None else "yes" if known else "no")
        t.add_row(*row)
    c.print(t)
    _workers_table(c, processes)
    # Why a process is not up (or ran degraded) matters more than any column: say it in words.
    for p in processes:
        # An unloaded model's reason is in the memory table below.
        if p.last_exit and p.status != Status.UNLOADED and (
                p.status != Status.UP or p.last_exit.startswith("degraded")):
            c.print(f"{p.name}: {p.last_exit}", highlight=False)
        if p.probe_skipped:
            c.print(f"{p.name}: end-to-end probe skipped: {p.probe_skipped}", highlight=False,
                    markup=False)


def _memory_table(c: Console, processes: Sequence[ProcessState],
                  budget: MemoryBudget | None) -> None:
    """Each model's runtime in memory: loaded, loading, idle or unloaded; memory estimated
    (what the budget admits it by) and held (measured); last use and why it was unloaded."""
    from rich.table import Table

    from sovctl.runtime.memory import describe
    from sovctl.units import human_bytes, human_duration

    runtimes = [p for p in processes if p.load_state]
    if not runtimes:
        return
    t = Table(box=None, pad_edge=False)
    for col in ("MODEL", "LOAD", "PIN", "STATE", "LAST USE", "ESTIMATED", "HELD", "LOADS",
                "UNLOADS", "EVICTED"):
        t.add_column(col, no_wrap=True)
    now = time.time()
    for p in runtimes:
        estimated = human_bytes(p.memory_estimated) + (
            f" + {human_bytes(p.vram_estimated)} VRAM" if p.vram_estimated else "")
        held = "-" if p.memory_held is None else human_bytes(p.memory_held) + (
            f" + {human_bytes(p.vram_held)} VRAM" if p.vram_held else "")
        last = "-" if p.last_used is None else human_duration(max(now - p.last_used, 0)) + " ago"
        t.add_row(p.model, p.load, "yes" if p.pinned else "-", p.load_state, last,
                  estimated, held, str(p.loads), str(p.unloads), str(p.evictions))
    c.print(t)
    if budget is not None:
        used = sum(p.memory_estimated for p in runtimes if p.load_state != "unloaded")
        c.print(f"memory: {human_bytes(used)} estimated in use of the budget, "
                f"{describe(budget)}; ESTIMATED is the plan's estimate, HELD is measured "
                "(resident set)", highlight=False, markup=False)
    for p in runtimes:
        if p.memory_wait:
            c.print(f"{p.model}: waiting for memory: {p.memory_wait}", highlight=False)
        elif p.unload_reason and p.load_state == "unloaded":
            c.print(f"{p.model}: {p.unload_reason}", highlight=False)


def _workers_table(c: Console, processes: Sequence[ProcessState]) -> None:
    """The [cluster] workers of each clustered runtime: health, and memory free and held."""
    from rich.table import Table

    from sovctl.runtime.documents import WorkerStatus
    from sovctl.units import human_bytes

    rows = [(p.name, w) for p in processes for w in p.workers]
    if not rows:
        return
    t = Table(box=None, pad_edge=False)
    for col in ("WORKER", "USED BY", "HEALTH", "FREE AT START", "HOLDS", "ASKED"):
        t.add_column(col)
    now = time.time()
    for name, w in rows:
        up = w.status == WorkerStatus.IN_USE
        health = w.status if up else f"{w.status} ({w.reason})"
        t.add_row(w.endpoint, name, f"[{'green' if up else 'red'}]{health}[/]",
                  f"{human_bytes(w.free)} of {human_bytes(w.total)}" if up else "-",
                  human_bytes(w.holds) if w.holds else "-", f"{now - w.checked_at:.0f}s ago")
    c.print(t)


def _processes_json(processes: Sequence[ProcessState],
                    tools: Mapping[str, bool | None] | None = None) -> list[dict[str, Any]]:
    from sovctl.result import jsonable

    now = time.time()
    return [{**jsonable(p), "uptime": round(p.uptime(now), 1),
             **({"tools": tools.get(p.model)} if tools is not None and p.kind == "runtime"
                else {})}
            for p in processes]


def _tool_support(url: str, key: str | None) -> dict[str, bool | None]:
    """Whether each served model takes tools, as the gateway's /v1/models tells (it asks each
    runtime's template once); None where the gateway does not know or does not answer."""
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        doc = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=5).json()
        return {m["id"]: m.get("capabilities", {}).get("tools") for m in doc["data"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def status(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Show each supervised process: role, model, pid, port, uptime, restarts, health, tools."""
    from sovctl.apikey import read_api_key
    from sovctl.runtime import control

    state = begin(ctx, json_out)
    st = control.status(state.home)
    tools = (_tool_support(st.url, read_api_key(state.home) if st.api_key_required else None)
             if st.running and st.url else None)

    def render(c: Console) -> None:
        if not st.running:
            c.print("no stack running from this home" +
                    (" (last run's processes below)" if st.processes else ""))
        else:
            c.print(f"stack at [bold]{st.url}[/], supervisor pid {st.supervisor_pid}")
        if st.processes:
            _status_table(c, st.processes, tools)
            _memory_table(c, st.processes, st.memory)
        for sw in st.switches:
            if not sw.over and st.running:
                # Under way: `sovctl upgrade --apply` or `rollback` in another shell.
                c.print(f"{sw.name}: switching to sha256 {sw.to_sha256[:12]} ({sw.why}): "
                        + ("the new runtime is starting; the old one serves"
                           if sw.phase == "starting" else
                           "the new runtime serves; the old one finishes its requests"),
                        highlight=False, markup=False)

    from sovctl.result import jsonable

    emit({**jsonable(st), "processes": _processes_json(st.processes, tools)}, render)


def stop(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds to wait before SIGKILL.")] = 20.0,
    json_out: JsonOpt = False,
) -> None:
    """Stop the running stack: SIGTERM, wait, then SIGKILL; nothing is left behind."""
    from sovctl.runtime import control

    state = begin(ctx, json_out)
    result = control.stop(state.home, timeout)

    def render(c: Console) -> None:
        if not result.was_running:
            c.print("no stack was running" + (f"; cleaned up {', '.join(result.stopped)}"
                                              if result.stopped else ""))
        else:
            c.print(f"stopped {', '.join(result.stopped)} ({result.how})")

    emit(result, render)


def logs(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Process name (default: the supervisor).")]
    = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
    = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show from the end.")]
    = 50,
) -> None:
    """Print a process's log (runtimes by model name, 'gateway', or the supervisor's)."""
    import sys

    from sovctl.runtime.control import log_file

    state = begin(ctx, False)
    path = log_file(state.home, name)
    _tail(path, lines, sys.stdout)
    if follow:
        _follow(path, sys.stdout)


def _tail(path: Path, lines: int, out: Any) -> None:
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(size - 256 * 1024, 0))
        data = f.read().decode(errors="replace").splitlines()
    for line in data[-lines:] if lines > 0 else []:
        out.write(line + "\n")
    out.flush()


def _follow(path: Path, out: Any) -> None:
    import os

    f = path.open("rb")
    f.seek(0, 2)
    try:
        while True:
            chunk = f.read()
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
                continue
            try:
                now = path.stat()
            except FileNotFoundError:  # between a rotation's rename and the new file
                now = None
            if now is not None and now.st_ino != os.fstat(f.fileno()).st_ino:
                # Rotated while running (the supervisor renames it to NAME.log.1): what was
                # written to the old file since the last read, then the new one from its start.
                out.write(f.read().decode(errors="replace"))
                f.close()
                f = path.open("rb")
            elif now is not None and now.st_size < f.tell():
                f.seek(0)  # truncated in place
            else:
                time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        f.close()


def service_install(
    ctx: typer.Context,
    chat: ChatOpt = None,
    embedding: EmbedOpt = None,
    rerank: RerankOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    user: Annotated[bool, typer.Option("--user", help="Install a user unit "
                                                      "(~/.config/systemd/user).")] = False,
    unit_dir: Annotated[Path | None, typer.Option(help="Write the unit here instead.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a systemd unit for the stack: restart on failure, sandboxed, loopback-only."""
    from sovctl.fsutil import atomic_write
    from sovctl.runtime.systemd import unit

    state = begin(ctx, json_out)
    cfg = settings({"serve.host": host, "serve.port": port})
    u = unit(state.home, cfg.serve.host, cfg.serve.port, chat or [],
             embedding or [], user, unit_dir, rerank=rerank or [])
    atomic_write(u.path, u.text.encode())

    def render(c: Console) -> None:
        c.print(f"wrote {u.path}")
        c.print("enable it with:")
        for cmd in u.commands:
            c.print(f"  {cmd}")

    emit({"path": u.path, "commands": u.commands, "loopback_only": u.loopback_only}, render)
