"""`sovctl cost`: own the hardware or pay the meter, from the bench, the ledger and [cost]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from sovctl.ledger.cost import AppCost, CostAnswer, Figure

LABELS = {
    "hardware_price": "hardware price",
    "lifetime_years": "lifetime (years)",
    "watts": "power (W)",
    "tokens_per_s": "tokens/s",
    "tariff": "electricity per kWh",
    "daily_tokens": "tokens a day",
    "cloud_per_mtok": "cloud per Mtok",
}



def _opt(help_: str) -> typer.models.OptionInfo:
    return typer.Option(metavar="N", help=help_, show_default=False)


def cost(
    ctx: typer.Context,
    hardware_price: Annotated[float | None, _opt(
        "What the hardware cost [default: cost.hardware_price].")] = None,
    lifetime_years: Annotated[float | None, _opt(
        "Years the hardware serves [default: cost.hardware_lifetime_years].")] = None,
    watts: Annotated[float | None, _opt(
        "Power drawn while generating [default: the latest bench, else bench.cpu_watts].")
    ] = None,
    tokens_per_s: Annotated[float | None, _opt(
        "Tokens a second the box makes [default: the latest bench].")] = None,
    tariff: Annotated[float | None, _opt(
        "Electricity price per kWh [default: cost.electricity_per_kwh].")] = None,
    daily_tokens: Annotated[float | None, _opt(
        "Tokens a day to serve [default: the ledger's last 30 days, else 0].")] = None,
    cloud_price: Annotated[float | None, _opt(
        "Cloud price per million tokens [default: [cost] prices, by the ledger's mix].")
    ] = None,
    app: Annotated[str | None, typer.Option(
        metavar="NAME", help="Also show what app NAME (its key's name: sovctl keys) cost over "
        "the last 30 days, here and on the meter.", show_default=False)] = None,
    chart: Annotated[bool, typer.Option(
        "--chart", help="Also draw the cumulative cost of owning against the meter, month by "
        "month, with the break-even marked (--json: adds data.curve).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Break-even of owning vs the cloud: cost per million tokens each way, months to break
    even, the daily volume above which owning wins, and a verdict."""
    from sovctl.cli._common import settings
    from sovctl.ledger.cost import answer

    state = begin(ctx, json_out)
    result = answer(state.home, settings(), {
        "hardware_price": hardware_price, "lifetime_years": lifetime_years, "watts": watts,
        "tokens_per_s": tokens_per_s, "tariff": tariff, "daily_tokens": daily_tokens,
        "cloud_per_mtok": cloud_price})
    if app is not None:
        import dataclasses

        from sovctl.ledger.cost import app_cost

        result = dataclasses.replace(result, app=app_cost(state.home, settings(), app))
    if not chart:
        emit(result, lambda c: render(c, result))
        return
    from sovctl.cli import charts
    from sovctl.ledger.dashboard import curve
    from sovctl.result import jsonable

    drawn = curve(result)

    def both(c: Console) -> None:
        charts.curve(c, drawn)
        c.print()
        render(c, result)

    emit({**jsonable(result), "curve": jsonable(drawn)}, both)


def render(c: Console, a: CostAnswer) -> None:
    from rich.markup import escape
    from rich.table import Table

    from sovctl.ledger.figures import MARKS, mark

    def money(f: Figure) -> str:
        return mark(f.source, f"{f.value:,.4f}") + f" {a.currency}"

    t = Table(box=None, pad_edge=False, title="inputs", title_justify="left")
    for col in ("INPUT", "VALUE", "SOURCE", "FROM"):
        t.add_column(col, no_wrap=col != "FROM", justify="right" if col == "VALUE" else "left")
    for name, f in a.inputs.items():
        assert f.value is not None
        value = f"{f.value:,.0f}" if f.value >= 1000 else f"{f.value:.6g}"
        t.add_row(LABELS[name], value, f.source, escape(f.basis))
    c.print(t)
    c.print()
    r = a.result
    local, electricity = r["local_per_mtok"], r["electricity_per_mtok"]
    if local.value is None:
        local_text = "- (no volume to spread the hardware over)"
    else:
        assert electricity.value is not None
        local_text = (f"{money(local)} (electricity {money(electricity)} + hardware "
                      f"{local.value - electricity.value:,.4f} {a.currency})")
    volume, months = r["break_even_daily_tokens"], r["months_to_break_even"]
    capacity = r["capacity_daily_tokens"]
    lines = [
        f"per million tokens: local {local_text}, cloud {money(r['cloud_per_mtok'])}",
        f"a day: local {money(r['local_per_day'])} (hardware {money(r['hardware_per_day'])} "
        f"of it), cloud {money(r['cloud_per_day'])}",
        "owning wins above: " + ("never (the cloud costs less than the electricity)"
                                 if volume.value is None
                                 else mark(volume.source, f"{volume.value:,.0f}")
                                 + " tokens a day")
        + f"; one box makes at most {mark(capacity.source, f'{capacity.value:,.0f}')}",
        "months to break even: " + ("never at this volume" if months.value is None
                                    else mark(months.source, f"{months.value:.1f}")),
        f"verdict: {a.verdict}",
    ]
    shown = {f.source for f in a.result.values() if f.value is not None}
    lines += [explained for source, explained in MARKS.items() if source in shown]
    if a.defaults:
        lines.append(f"built-in defaults used for: {', '.join(LABELS[d] for d in a.defaults)} "
                     "(set them by flag, or in sovctl.toml [cost] and [bench])")
    if a.app is not None:
        lines += _app_lines(a.app, money)
    for line in lines:
        c.print(line, highlight=False, markup=False)


def _app_lines(p: AppCost, money: Callable[[Figure], str]) -> list[str]:
    from sovctl.ledger.figures import mark
    from sovctl.units import human_tokens

    def tokens(f: Figure) -> str:
        return mark(f.source, human_tokens(f.value or 0))

    share = "-" if p.share.value is None else mark(p.share.source, f"{p.share.value:.1%}")
    unpriced = (f" (+ {tokens(p.unpriced_tokens)} local tokens of models never benched, not "
                "priced)" if p.unpriced_tokens.value else "")
    return [
        "",
        f"app {p.name}, the last {p.days} days: {p.requests} requests, "
        f"{tokens(p.tokens_in)} tokens in, {tokens(p.tokens_out)} out ({share} of all): "
        f"{tokens(p.local_tokens)} here, {tokens(p.routed_tokens)} routed out",
        f"  on the meter {money(p.at_meter)}; here {money(p.here)} (local "
        f"{money(p.local_cost)}{unpriced}, frontier {money(p.routed_spend)}); "
        f"saved {money(p.saved)}",
    ]
