"""`sovctl cost`: own the hardware or pay the meter, from the bench, the ledger and [cost]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.ledger.cost import CostAnswer

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
    emit(result, lambda c: render(c, result))


def render(c: Console, a: CostAnswer) -> None:
    from rich.markup import escape
    from rich.table import Table

    money = f"{{:,.4f}} {a.currency}".format
    t = Table(box=None, pad_edge=False, title="inputs", title_justify="left")
    for col in ("INPUT", "VALUE", "FROM"):
        t.add_column(col, no_wrap=col != "FROM", justify="right" if col == "VALUE" else "left")
    for name, f in a.inputs.items():
        value = f"{f.value:,.0f}" if f.value >= 1000 else f"{f.value:.6g}"
        t.add_row(LABELS[name], value, escape(f.source))
    c.print(t)
    c.print()
    b = a.result
    if b.local_per_mtok is None:
        local = "- (no volume to spread the hardware over)"
    else:
        local = (f"{money(b.local_per_mtok)} (electricity {money(b.electricity_per_mtok)} + "
                 f"hardware {money(b.local_per_mtok - b.electricity_per_mtok)})")
    lines = [
        f"per million tokens: local {local}, cloud {money(b.cloud_per_mtok)}",
        f"a day: local {money(b.local_per_day)} (hardware {money(b.hardware_per_day)} of it), "
        f"cloud {money(b.cloud_per_day)}",
        "owning wins above: " + ("never (the cloud costs less than the electricity)"
                                 if b.break_even_daily_tokens is None
                                 else f"{b.break_even_daily_tokens:,.0f} tokens a day")
        + f"; one box makes at most {b.capacity_daily_tokens:,.0f}",
        "months to break even: " + ("never at this volume" if b.months_to_break_even is None
                                    else f"{b.months_to_break_even:.1f}"),
        f"verdict: {a.verdict}",
    ]
    if a.defaults:
        lines.append(f"built-in defaults used for: {', '.join(LABELS[d] for d in a.defaults)} "
                     "(set them by flag, or in sovctl.toml [cost] and [bench])")
    for line in lines:
        c.print(line, highlight=False, markup=False)
