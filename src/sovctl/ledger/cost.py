"""`sovctl cost`: the break-even inputs, each with where it came from, and the answer.

Each input is a flag when given, else the best figure at hand, else a default that is named
as one: hardware price, lifetime and tariff from [cost]; power and tokens per second from the
latest bench (its generation phase, blended with its prompt phase by the ledger's mix of
prompt and generated tokens); daily volume from the ledger's last 30 days; the cloud price
from [cost]'s output and input prices, blended by the same mix. The math is
`sovctl.bench.costs.break_even`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sovctl.bench import costs
from sovctl.errors import ConfigError
from sovctl.home import Home
from sovctl.ledger import store

WINDOW_DAYS = 30
# Tokens a second assumed when no bench was run and no flag given: one stream of a 7-8B model
# at 4 bits on one consumer GPU, the class of box this calculator is usually asked about.
DEFAULT_TOKENS_PER_S = 50.0


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # "flag", "config", "bench RUN ...", "ledger ...", "default ..."
    default: bool  # a built-in default, not a measurement or a choice of the operator's


@dataclass(frozen=True)
class Volume:
    """What the ledger says about the last days' traffic (served requests only)."""

    tokens_in: int
    tokens_out: int
    active_days: int
    days: int  # looked at: from the first record in the window to today, in UTC days


@dataclass(frozen=True)
class CostAnswer:
    currency: str
    inputs: dict[str, Figure]
    result: costs.BreakEven
    verdict: str
    defaults: tuple[str, ...]  # the inputs that are built-in defaults
    ledger: Volume | None
    bursty: bool


def volume(home: Home, now: float, days: int = WINDOW_DAYS) -> Volume | None:
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    start = dt.datetime.combine(today - dt.timedelta(days - 1), dt.time(), dt.UTC)
    path = store.ledger_path(home)
    served = [g for g in store.groups(path, start.timestamp(), now)
              if g.route != store.UNROUTED]
    if not served:
        return None
    first = dt.date.fromisoformat(served[0].day)  # groups come ordered by day
    return Volume(tokens_in=sum(g.tokens_in for g in served),
                  tokens_out=sum(g.tokens_out for g in served),
                  active_days=len({g.day for g in served}),
                  days=(today - first).days + 1)


def _config(settings: Any, key: str) -> Figure:
    source = settings.source(key)
    return Figure(float(settings.get(key)), "default" if source == "default" else source,
                  source == "default")


def answer(home: Home, settings: Any, flags: Mapping[str, float | None],
           now: float | None = None) -> CostAnswer:
    """`flags`: hardware_price, lifetime_years, watts, tokens_per_s, tariff, daily_tokens,
    cloud_per_mtok; None where not given."""
    from sovctl.bench import history

    now = time.time() if now is None else now
    seen = volume(home, now)
    total = (seen.tokens_in + seen.tokens_out) if seen else 0
    share_in = seen.tokens_in / total if seen and total else None
    mix = f"the ledger's mix ({share_in:.0%} prompt tokens)" if share_in is not None else ""

    inputs: dict[str, Figure] = {
        "hardware_price": _config(settings, "cost.hardware_price"),
        "lifetime_years": _config(settings, "cost.hardware_lifetime_years"),
        "tariff": _config(settings, "cost.electricity_per_kwh"),
    }
    try:
        bench = costs.latest_bench(history.load(home))
    except ConfigError:
        bench = None  # an unreadable history is `sovctl bench history`'s to report
    if bench is not None:
        pp, tg = bench.pp or bench.tg, bench.tg or bench.pp
        assert pp is not None and tg is not None
        s = share_in if share_in is not None and bench.pp and bench.tg else 0.0
        # Per token: time and energy of each phase, weighted by its share of the tokens.
        seconds = s / pp.tokens_per_s + (1 - s) / tg.tokens_per_s
        joules = s * pp.joules_per_token + (1 - s) * tg.joules_per_token
        how = bench.describe() + (f", prompt and generation by {mix}" if s else
                                  ", generation phase")
        inputs["watts"] = Figure(joules / seconds, how, False)
        inputs["tokens_per_s"] = Figure(1 / seconds, how, False)
    else:
        watts = _config(settings, "bench.cpu_watts")
        inputs["watts"] = Figure(watts.value, f"bench.cpu_watts ({watts.source}); no bench run",
                                 watts.default)
        inputs["tokens_per_s"] = Figure(DEFAULT_TOKENS_PER_S, "default; no bench run", True)
    if seen is not None:
        inputs["daily_tokens"] = Figure(total / seen.days, f"ledger, the last {seen.days} "
                                        f"day{'s' if seen.days > 1 else ''}", False)
    else:
        inputs["daily_tokens"] = Figure(0.0, "default; nothing in the ledger", True)
    out = _config(settings, "cost.cloud_price_per_mtok")
    if share_in is not None:
        cin = _config(settings, "cost.cloud_input_price_per_mtok")
        inputs["cloud_per_mtok"] = Figure(
            share_in * cin.value + (1 - share_in) * out.value,
            f"cost.cloud_input_price_per_mtok and cost.cloud_price_per_mtok by {mix}",
            cin.default and out.default)
    else:
        inputs["cloud_per_mtok"] = Figure(out.value, f"cost.cloud_price_per_mtok ({out.source})",
                                          out.default)
    for name, value in flags.items():
        if value is not None:
            inputs[name] = Figure(float(value), "flag", False)

    given = costs.BreakEvenInputs(**{k: f.value for k, f in inputs.items()})
    result = costs.break_even(given)
    # Burstiness is the ledger's to tell: a volume given by flag says nothing of its spread.
    traffic = (costs.Traffic(seen.active_days, seen.days)
               if seen is not None and inputs["daily_tokens"].source != "flag" else None)
    currency = str(settings.get("cost.currency"))
    return CostAnswer(
        currency=currency, inputs=inputs, result=result,
        verdict=costs.verdict(given, result, currency, traffic),
        defaults=tuple(k for k, f in inputs.items() if f.default), ledger=seen,
        bursty=traffic is not None and traffic.bursty)
