"""`sovctl ledger`: the token ledger over a period, for people and for scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.ledger.report import LedgerReport

BAR = 40  # characters of the longest day's bar



def ledger(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(
        metavar="SPAN|DATE", help="Start of the period: a span back from now (24h, 7d, 2w) "
        "or a UTC date (2025-01-31).")] = "7d",
    by: Annotated[str, typer.Option(
        metavar="day|model|route", help="Group the table by day, model or route.")] = "day",
    json_out: JsonOpt = False,
) -> None:
    """Show what stayed home and what went out: local share of tokens, spend by provider,
    and what the local volume would have cost at the reference cloud price."""
    from sovctl.cli._common import settings
    from sovctl.ledger.report import report

    state = begin(ctx, json_out)
    result = report(state.home, settings(), since=since, by=by)
    emit(result, lambda c: render(c, result))


def _tokens(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def render(c: Console, r: LedgerReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    money = f"{{:,.4f}} {r.currency}".format
    c.print(f"ledger {r.path}, {r.since} to {r.until}", highlight=False, markup=False)
    if not r.requests:
        c.print("no requests recorded in this period")
        return
    share = "-" if r.local_share is None else f"{r.local_share:.1%}"
    c.print(f"{r.requests} requests, {_tokens(r.tokens)} tokens: local share {share} "
            f"({_tokens(r.local_tokens)} local, {_tokens(r.routed_tokens)} routed out)",
            highlight=False, markup=False)
    spend = ", ".join(f"{name} {money(v)}" for name, v in r.spend.items()) or "nothing"
    c.print(f"spend by provider: {spend}", highlight=False, markup=False)
    unpriced = (f" (+ {_tokens(r.local_unpriced_tokens)} tokens of models never benched, "
                "not priced: run 'sovctl bench MODEL')" if r.local_unpriced_tokens else "")
    c.print(f"local cost {money(r.local_cost)}{unpriced}; the same volume at the reference "
            f"cloud price ({r.cloud_input_per_mtok:g} in / {r.cloud_output_per_mtok:g} out per "
            f"Mtok) {money(r.local_at_cloud_price)}", highlight=False, markup=False)
    c.print()
    t = Table(box=None, pad_edge=False, title=f"by {r.by}", title_justify="left")
    for col in (r.by.upper(), "REQUESTS", "TOKENS IN", "TOKENS OUT", "LOCAL", "ROUTED",
                "COST"):
        t.add_column(col, no_wrap=True, justify="left" if col == r.by.upper() else "right")
    for row in r.rows:
        t.add_row(escape(row.key), str(row.requests), _tokens(row.tokens_in),
                  _tokens(row.tokens_out), _tokens(row.local_tokens), _tokens(row.routed_tokens),
                  money(row.cost))
    c.print(t)
    c.print()
    # A bar a day: '#' local tokens, '>' routed out, scaled to the busiest day.
    busiest = max((d.local_tokens + d.routed_tokens for d in r.days), default=0) or 1
    c.print("tokens a day ('#' local, '>' routed out)", markup=False)
    for d in r.days:
        local = round(d.local_tokens / busiest * BAR)
        out = round(d.routed_tokens / busiest * BAR)
        c.print(f"{d.day} {'#' * local}{'>' * out} {_tokens(d.local_tokens + d.routed_tokens)}",
                highlight=False, markup=False)
