"""Commands for the audit: `audit blackout` and `audit baseline`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import STATE, JsonOpt, begin, emit

if TYPE_CHECKING:
    from rich.console import Console

ChatOpt = Annotated[list[str] | None, typer.Option(
    "--chat", metavar="NAME", help="Store name of a chat model to serve (repeatable).")]
EmbedOpt = Annotated[list[str] | None, typer.Option(
    "--embedding", metavar="NAME",
    help="Store name of an embedding model to serve (repeatable).")]
RerankOpt = Annotated[list[str] | None, typer.Option(
    "--rerank", metavar="NAME",
    help="Store name of a reranker to serve on /v1/rerank (repeatable).")]
# Test-only: every process of the stack attempts one outbound connect to HOST:PORT at start,
# which check 6 must catch. Hidden from --help; the report records that it was used.
ProbeOpt = Annotated[str | None, typer.Option("--egress-probe", hidden=True)]


def group() -> typer.Typer:
    audit = typer.Typer(name="audit", help="Prove the stack works with no network at all.",
                        no_args_is_help=True, rich_markup_mode=None)
    audit.command("blackout")(blackout)
    audit.command("baseline")(baseline)
    return audit


def _progress(message: str) -> None:
    if not STATE.json:
        from sovctl.cli._common import err_console

        err_console.print(f"[dim]{message}…[/]", highlight=False)


def blackout(
    ctx: typer.Context,
    chat: ChatOpt = None,
    embedding: EmbedOpt = None,
    rerank: RerankOpt = None,
    egress_probe: ProbeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the stack in a network namespace with only loopback, check it, and file a report.

    Exit code 0 only when all eight checks pass; 1 when one fails; 8 when no network
    namespace can be created (nothing is run then, and no weaker mode is tried).
    """
    from sovctl.audit.blackout import blackout as run_blackout
    from sovctl.errors import CheckFailed

    state = begin(ctx, json_out)
    report = run_blackout(state.home, {}, chat or [], embedding or [], rerank=rerank or [],
                          egress_probe=egress_probe, progress=_progress)
    failure = None
    if not report.passed:
        failed = ", ".join(f"{c.id} ({c.name})" for c in report.failed)
        failure = CheckFailed(f"blackout audit failed: check {failed} did not pass",
                              hint=f"the evidence is in {report.path}")

    def render(c: Console) -> None:
        from rich.table import Table

        from sovctl.units import human_bytes

        t = Table(box=None, pad_edge=False, show_lines=False)
        t.add_column("#", justify="right")
        t.add_column("CHECK", no_wrap=True)
        t.add_column("RESULT", no_wrap=True)
        t.add_column("EVIDENCE", overflow="fold")
        t.add_column("TIME", justify="right", no_wrap=True)
        for chk in report.checks:
            verdict = "[green]PASS[/]" if chk.passed else "[bold red]FAIL[/]"
            t.add_row(str(chk.id), chk.name, verdict, chk.evidence, f"{chk.seconds:.2f}s")
        c.print(t)
        models = ", ".join(f"{m.name} ({m.role}, sha256 {m.sha256[:12]})" for m in report.models)
        c.print(f"models: {models}", highlight=False)
        bridged = report.isolation.get("bridged") or []
        c.print(f"isolation: {report.isolation['mode']} {report.isolation['netns']}, "
                "loopback only" + ("; the audit's relay to the \\[cluster] workers: " + ", ".join(
                    f"{b['endpoint']} ({b['connections']} connections, "
                    f"{human_bytes(b['bytes_to_worker'])} sent, "
                    f"{human_bytes(b['bytes_from_worker'])} received"
                    + (f"; {len(b['failed_connects'])} connects to it failed: "
                       f"{b['failed_connects'][-1]}" if b["failed_connects"] else "") + ")"
                    for b in bridged) if bridged else ""), highlight=False)
        if report.baseline.get("note"):
            c.print(f"baseline: {report.baseline['note']}", highlight=False)
        passed = sum(chk.passed for chk in report.checks)
        verdict = "[green]PASS[/]" if report.passed else "[bold red]FAIL[/]"
        c.print(f"{verdict}: {passed}/{len(report.checks)} checks passed in "
                f"{report.timings.get('total', 0):.1f}s; report: {report.path}", highlight=False)

    emit(report, render, failure)


def baseline(
    ctx: typer.Context,
    chat: ChatOpt = None,
    embedding: EmbedOpt = None,
    rerank: RerankOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Record the behaviour the blackout compares with, with the network available.

    Starts the stack normally, sends the fixed requests (temperature 0, fixed seed), and keeps
    the answers per model and per model file (sha256) under HOME/audit/baselines.
    """
    from sovctl.audit.blackout import record_baseline

    state = begin(ctx, json_out)
    result = record_baseline(state.home, {}, chat or [], embedding or [], rerank=rerank or [],
                             progress=_progress)

    def render(c: Console) -> None:
        from rich.table import Table

        t = Table(box=None, pad_edge=False)
        for col in ("MODEL", "ROLE", "SHA256", "FILE"):
            t.add_column(col, overflow="fold")
        for m, path in zip(result.models, result.files, strict=True):
            t.add_row(m.name, m.role, m.sha256[:12], path)
        c.print(t)
        c.print(f"recorded {len(result.answers)} fixed answers in {result.seconds:.1f}s "
                f"({result.network})", highlight=False)

    emit(result, render)
