"""`sovctl upgrade` and `sovctl rollback`: change a model's weights on purpose, compared first,
switched without a lost request, and switched back the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import STATE, JsonOpt, begin, emit, human_bytes, settings
from sovctl.cli._progress import bars
from sovctl.errors import SovctlError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.audit.upgrade import Comparison, Switched, UpgradeResult


def _progress(message: str) -> None:
    if not STATE.json:
        from rich.markup import escape

        from sovctl.cli._common import err_console

        err_console.print(f"[dim]{escape(message)}…[/]", highlight=False)


def upgrade(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The store name to upgrade.",
                                        show_default=False)],
    ref: Annotated[str | None, typer.Argument(
        metavar="REF", help="The candidate: any REF 'sovctl pull' takes (hf://ORG/REPO/FILE.gguf"
        ", ORG/REPO:QUANT, a local path, an https:// URL with --sha256). Without it, --apply "
        "applies the candidate compared last.", show_default=False)] = None,
    apply: Annotated[bool, typer.Option(
        "--apply", help="Switch NAME to the candidate: live, with no failed request, where a "
        "stack serves it; the lock keeps the pin it had as 'previous'.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="With --apply: apply even when the candidate fails a check the pin "
        "passes now.")] = False,
    revision: Annotated[str, typer.Option(
        metavar="REV", help="Branch, tag or commit of REF; pinned as its commit.")] = "main",
    sha256: Annotated[str | None, typer.Option(
        "--sha256", metavar="HEX", help="Expected sha256 of the candidate's file.")] = None,
    endpoint: Annotated[str | None, typer.Option(
        metavar="URL", help="Hugging Face compatible endpoint, e.g. a sovctl mirror [env: "
        "SOVCTL_HUB__ENDPOINT, HF_ENDPOINT; default: https://huggingface.co].")] = None,
    trust_on_first_use: Annotated[bool, typer.Option(
        "--trust-on-first-use", help="Accept a download with no expected sha256.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Pull a candidate beside NAME's pin, compare the two on the audit's fixed requests and
    your [eval] cases (answers, checks, tokens/s, memory); with --apply, switch to it."""
    import os

    from sovctl.audit import upgrade as use_case

    state = begin(ctx, json_out)
    if ref is None and not apply:
        raise UsageError("nothing to do: give the candidate's REF to compare it, or --apply "
                         "to apply the candidate compared last",
                         hint=f"e.g. sovctl upgrade {name} hf://ORG/REPO/FILE.gguf")
    if force and not apply:
        raise UsageError("--force only applies with --apply", hint="add --apply, or drop --force")
    comparison = None
    if ref is not None:
        cfg = settings({"hub.endpoint": endpoint})
        with bars() as fetch:
            comparison = use_case.compare(
                state.home, name, ref, flags={}, revision=revision, sha256=sha256,
                endpoint=cfg.hub.endpoint, trust_on_first_use=trust_on_first_use,
                fetch_progress=fetch, token=os.environ.get("HF_TOKEN"), progress=_progress)
        if apply and not STATE.json:
            _render_comparison(_console(), comparison)
    elif sha256 is not None or revision != "main" or endpoint or trust_on_first_use:
        raise UsageError("--sha256, --revision, --endpoint and --trust-on-first-use are for "
                         "the REF to pull", hint="give REF, or drop them")
    applied = None
    if apply:
        try:
            applied = use_case.apply(state.home, name, flags={}, force=force,
                                     progress=_progress)
        except SovctlError as e:
            if comparison is None:
                raise
            # The comparison (shown above) still goes out with the refusal, under --json in
            # the one document.
            emit(use_case.UpgradeResult(comparison, None), lambda c: None, e)
    result = use_case.UpgradeResult(comparison, applied)
    emit(result, lambda c: _render(c, result))


def rollback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The store name to roll back.",
                                        show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Switch NAME back to the pin it had before its last upgrade, the same way: live, with no
    failed request, where a stack serves it."""
    from sovctl.audit import upgrade as use_case

    state = begin(ctx, json_out)
    switched = use_case.rollback(state.home, name, flags={}, progress=_progress)
    emit(switched, lambda c: _render_switched(c, switched))


def _console() -> Console:
    from sovctl.cli._common import console

    return console


def _render(c: Console, result: UpgradeResult) -> None:
    if result.comparison is not None and result.applied is None:
        _render_comparison(c, result.comparison)
    if result.applied is not None:
        _render_switched(c, result.applied)


def _speed(tps: float | None) -> str:
    return f"{tps:g}" if tps is not None else "-"


def _held(n: int | None) -> str:
    return human_bytes(n) if n is not None else "-"


def _render_comparison(c: Console, cmp: Comparison) -> None:
    from rich.markup import escape
    from rich.table import Table

    now, later = cmp.current, cmp.candidate
    t = Table(box=None, pad_edge=False)
    t.add_column("")
    t.add_column("CURRENT", overflow="fold")
    t.add_column("CANDIDATE", overflow="fold")
    t.add_row("sha256", now.sha256[:12], later.sha256[:12])
    t.add_row("file", escape(now.ref), escape(later.ref))
    t.add_row("size", human_bytes(now.size), human_bytes(later.size))
    t.add_row("checks passed", f"{now.checks_passed}/{now.checks_total}",
              f"{later.checks_passed}/{later.checks_total}")
    t.add_row("tokens/s (measured)", _speed(now.tokens_per_s), _speed(later.tokens_per_s))
    t.add_row("memory held (measured RSS)", _held(now.memory_held), _held(later.memory_held))
    t.add_row("memory (estimated)", human_bytes(now.memory_estimated),
              human_bytes(later.memory_estimated))
    c.print(f"[bold]{cmp.name}[/] ({cmp.role}): the pin served now and the candidate, side by "
            f"side ({cmp.seconds:.1f}s)", highlight=False)
    c.print(t)
    a = Table(box=None, pad_edge=False, title="answers that changed", title_justify="left")
    a.add_column("REQUEST", no_wrap=True)
    a.add_column("CURRENT", overflow="fold", ratio=1)
    a.add_column("CANDIDATE", overflow="fold", ratio=1)
    for pair in cmp.changed:
        a.add_row(pair.request, escape(_cut(pair.current)), escape(_cut(pair.candidate)))
    if cmp.changed:
        c.print(a)
    same = len(cmp.answers) - len(cmp.changed)
    c.print(f"{len(cmp.changed)} answer(s) changed, {same} the same", highlight=False)
    failed = [k for k in cmp.checks if not (k.current and k.candidate)]
    for k in failed:
        c.print(f"  {k.name}: current {'[green]pass[/]' if k.current else '[red]FAIL[/]'}, "
                f"candidate {'[green]pass[/]' if k.candidate else '[red]FAIL[/]'}"
                + escape(f" ({k.candidate_detail or k.current_detail})"), highlight=False)
    for why in cmp.skipped:
        c.print(f"  [dim]not sent: {escape(why)}[/]", highlight=False)
    if cmp.regressions:
        c.print(f"[yellow]the candidate fails {len(cmp.regressions)} check(s) the pin passes: "
                f"{', '.join(cmp.regressions)}[/]", highlight=False)
    c.print(f"[dim]tokens/s {escape(later.tokens_per_s_source)}; filed in {cmp.path}[/]",
            highlight=False)
    c.print(f"[dim]nothing served changed; apply it with: sovctl upgrade {cmp.name} --apply[/]",
            highlight=False)


def _cut(text: str, n: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[:n] + "…"


def _render_switched(c: Console, s: Switched) -> None:
    c.print(f"[green]{s.text}[/]", highlight=False)
    if s.live:
        c.print(f"  the running stack switched live: {s.process} served by the new weights "
                f"with no failed request ({s.seconds:.1f}s; the old runtime finished its "
                f"requests in {s.drain_seconds:.2f}s"
                + (", and is still finishing some" if s.phase == "draining" else "") + ")",
                highlight=False)
    else:
        c.print(f"  no running stack serves it: the next 'sovctl serve' serves sha256 "
                f"{s.to_sha256[:12]}", highlight=False)
    if s.baseline:
        c.print(f"  baseline recorded: {s.baseline}", highlight=False)
    other = "previous" if s.why == "upgrade" else "previous (a rollback returns to it)"
    c.print(f"  the lock keeps sha256 {s.from_sha256[:12]} as {other}; undo with: sovctl "
            f"rollback {s.name}", highlight=False)
