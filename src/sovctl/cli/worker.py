"""`sovctl worker`: an RPC worker lending this box's memory and compute to a head, supervised."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import STATE, DetachOpt, JsonOpt, begin, emit, settings
from sovctl.llamacpp import RPC_PORT  # a leaf: the option's default costs no start-up time

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.runtime.documents import StackState



def worker(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(
        help="Address to listen on: loopback, private or WireGuard (RPC is unauthenticated).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = RPC_PORT,
    device: Annotated[str, typer.Option(help="Device to lend: cpu or cuda:N.")] = "cpu",
    threads: Annotated[int, typer.Option(
        help="Threads of the CPU device (default: the machine's physical cores).",
        show_default=False)] = 0,
    cache: Annotated[bool, typer.Option(
        "--cache", help="Keep tensors it is sent under the home: a restarted head sends "
        "hashes, not the weights again.")] = False,
    unauthenticated: Annotated[bool, typer.Option(
        "--i-know-rpc-is-unauthenticated",
        help="Allow a public or every-interface address (guard it with a firewall).")] = False,
    detach: DetachOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run",
                                          help="Print the worker's argv; start nothing.")]
    = False,
    json_out: JsonOpt = False,
) -> None:
    """Run an RPC worker (llama.cpp's ggml-rpc-server) for a head's [cluster], supervised."""
    from sovctl.hostinfo import physical_cores
    from sovctl.ops import stack
    from sovctl.runtime import cluster, control

    state = begin(ctx, json_out)
    home = state.home
    plan, scope = cluster.worker_plan(home, settings({}), host, port, device,
                                      threads or physical_cores(), cache, unauthenticated)
    spec = plan.processes[0]
    endpoint = f"{host}:{port}"
    doc = {"endpoint": endpoint, "scope": scope, "argv": list(spec.argv.args),
           "notes": plan.notes}

    def notes(c: Console) -> None:
        for n in plan.notes:
            c.print(f"[yellow]note:[/] {n}", highlight=False)

    if dry_run:
        def render_dry(c: Console) -> None:
            notes(c)
            c.print(f"[bold]worker[/] ({scope}, {endpoint})")
            c.print("  " + str(spec.argv), highlight=False, soft_wrap=True)

        emit(doc, render_dry)
        return
    if detach:
        _, st = stack.start(home, plan)

        def render_detached(c: Console) -> None:
            notes(c)
            c.print(f"worker up at [bold]{endpoint}[/] ({scope}; supervisor pid "
                    f"{st.supervisor_pid}); add it to the head's [cluster] workers")
            c.print("stop it with: sovctl stop")

        emit({**doc, "supervisor_pid": st.supervisor_pid}, render_detached)
        return

    from sovctl.cli import _common
    from sovctl.runtime.documents import Status

    seen: dict[str, Status] = {}

    def on_change(st: StackState) -> None:
        for p in st.processes:
            if not STATE.json and seen.get(p.name) != p.status:
                seen[p.name] = p.status
                why = f" ({p.last_exit})" if p.last_exit and p.status != Status.UP else ""
                _common.console.print(f"{time.strftime('%H:%M:%S')} {p.name}: {p.status}{why}")

    if not STATE.json:
        notes(_common.err_console)
        _common.console.print(f"RPC worker at [bold]{endpoint}[/] ({scope}; Ctrl-C stops)")
    stack.admit(home, plan)
    control.run_foreground(home, plan, on_change)
    emit({**doc, "stopped": True}, lambda c: c.print("stopped"))
