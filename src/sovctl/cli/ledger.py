"""`sovctl ledger`: the token ledger over a period, for people and for scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit
from sovctl.units import human_tokens

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.ledger.figures import Amount
    from sovctl.ledger.report import LedgerReport

BAR = 40  # characters of the longest day's bar



def ledger(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(
        metavar="SPAN|DATE", help="Start of the period: a span back from now (24h, 7d, 2w) "
        "or a UTC date (2025-01-31).")] = "7d",
    by: Annotated[str, typer.Option(
        metavar="day|model|route|app", help="Group the table by day, model, route or app "
        "(the key a request came with: sovctl keys).")] = "day",
    chart: Annotated[bool, typer.Option(
        "--chart", help="Also draw the local share of tokens by day against the 95/5 line "
        "(--json: adds data.chart).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show what stayed home and what went out: local share of tokens, spend by provider,
    and what the local volume would have cost at the reference cloud price."""
    from sovctl.cli._common import settings
    from sovctl.ledger.report import report

    state = begin(ctx, json_out)
    result = report(state.home, settings(), since=since, by=by)
    if not chart:
        emit(result, lambda c: render(c, result))
        return
    from sovctl.cli import charts
    from sovctl.ledger.dashboard import LOCAL_TARGET, share_by_day
    from sovctl.result import jsonable

    days = share_by_day(result.days)

    def both(c: Console) -> None:
        render(c, result)
        c.print()
        charts.share(c, days, LOCAL_TARGET)

    emit({**jsonable(result), "chart": {"target": LOCAL_TARGET, "days": jsonable(days)}}, both)


def _mark(a: Amount, text: str) -> str:
    from sovctl.ledger.figures import mark

    return mark(a.source, text)


def _t(a: Amount) -> str:
    return _mark(a, human_tokens(a.value or 0))


def render(c: Console, r: LedgerReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    from sovctl.ledger.figures import DEFAULTED, Amount, weakest

    def money(a: Amount) -> str:
        return _mark(a, f"{a.value or 0:,.4f} {r.currency}")

    c.print(f"ledger {r.path}, {r.since} to {r.until}", highlight=False, markup=False)
    if not r.requests:
        c.print("no requests recorded in this period")
        return
    share = "-" if r.local_share.value is None else _mark(r.local_share,
                                                          f"{r.local_share.value:.1%}")
    c.print(f"{r.requests} requests, {_t(r.tokens)} tokens: local share {share} "
            f"({_t(r.local_tokens)} local, {_t(r.routed_tokens)} routed out)",
            highlight=False, markup=False)
    spend = ", ".join(f"{name} {money(v)}" for name, v in r.spend.items()) or "nothing"
    c.print(f"spend by provider: {spend}", highlight=False, markup=False)
    unpriced = (f" (+ {_t(r.local_unpriced_tokens)} tokens of models never benched, "
                "not priced: run 'sovctl bench MODEL')" if r.local_unpriced_tokens.value else "")
    prices = (f"{_mark(r.cloud_input_per_mtok, f'{r.cloud_input_per_mtok.value:g}')} in / "
              f"{_mark(r.cloud_output_per_mtok, f'{r.cloud_output_per_mtok.value:g}')} out")
    c.print(f"local cost {money(r.local_cost)}{unpriced}; the same volume at the reference "
            f"cloud price ({prices} per Mtok) {money(r.local_at_cloud_price)}",
            highlight=False, markup=False)
    c.print()
    t = Table(box=None, pad_edge=False, title=f"by {r.by}", title_justify="left")
    for col in (r.by.upper(), "REQUESTS", "TOKENS IN", "TOKENS OUT", "LOCAL", "ROUTED",
                "COST"):
        t.add_column(col, no_wrap=True, justify="left" if col == r.by.upper() else "right")
    for row in r.rows:
        t.add_row(escape(row.key), str(row.requests), _t(row.tokens_in), _t(row.tokens_out),
                  _t(row.local_tokens), _t(row.routed_tokens), money(row.cost))
    c.print(t)
    c.print()
    # A bar a day: '#' local tokens, '>' routed out, scaled to the busiest day.
    busiest = max(((d.local_tokens.value or 0) + (d.routed_tokens.value or 0)
                   for d in r.days), default=0) or 1
    c.print("tokens a day ('#' local, '>' routed out)", markup=False)
    for d in r.days:
        local, routed = d.local_tokens.value or 0, d.routed_tokens.value or 0
        day_total = Amount(local + routed, weakest(d.local_tokens.source,
                                                   d.routed_tokens.source))
        c.print(f"{d.day} {'#' * round(local / busiest * BAR)}"
                f"{'>' * round(routed / busiest * BAR)} {_t(day_total)}",
                highlight=False, markup=False)
    notes = []
    if r.estimated.tokens or r.estimated.cost:
        notes.append(f"~ partly estimated: {human_tokens(r.estimated.tokens)} tokens counted from "
                     "answers that reported no usage (a client that hung up, a cut stream), "
                     f"{r.estimated.cost:,.4f} {r.currency} of cost priced from them or from a "
                     "bench's estimated energy (no power meter)")
    if DEFAULTED in (r.cloud_input_per_mtok.source, r.cloud_output_per_mtok.source):
        notes.append("* a built-in default: set cost.cloud_input_price_per_mtok and "
                     "cost.cloud_price_per_mtok in sovctl.toml")
    if notes:
        c.print()
    for note in notes:
        c.print(note, highlight=False, markup=False)
