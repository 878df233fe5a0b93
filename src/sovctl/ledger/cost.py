"""`sovctl cost`: the break-even inputs, each with where it came from, and the answer.

Each input is a flag when given, else the best figure at hand, else a default that is named
as one: hardware price, lifetime and tariff from [cost]; power and tokens per second from the
latest bench (its generation phase, blended with its prompt phase by the ledger's mix of
prompt and generated tokens); daily volume from the ledger's last 30 days; the cloud price
from [cost]'s output and input prices, blended by the same mix. The math is
`sovctl.bench.costs.break_even`. Every input and result says its source
(`sovctl.ledger.figures`): a result takes the least certain source of the inputs it uses.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sovctl.apikey import app_keys_path, read_app_keys
from sovctl.bench import costs, history
from sovctl.config import Settings
from sovctl.errors import ConfigError, NotFoundError
from sovctl.home import Home
from sovctl.ledger import store
from sovctl.ledger.figures import (
    DEFAULTED,
    ESTIMATED,
    FLAG,
    MEASURED,
    setting_source,
    weakest,
)

WINDOW_DAYS = 30
# Tokens a second assumed when no bench was run and no flag given: one stream of a 7-8B model
# at 4 bits on one consumer GPU, the class of box this calculator is usually asked about.
DEFAULT_TOKENS_PER_S = 50.0


@dataclass(frozen=True)
class Figure:
    value: float | None  # None: the math gives none (no volume to divide by)
    source: str  # measured | flag | configured | estimated | defaulted
    basis: str  # where it comes from, in words: "bench RUN of MODEL", "cost.tariff", ...


# The inputs each result of costs.break_even is computed from.
_ELECTRICITY = ("watts", "tokens_per_s", "tariff")
_HARDWARE = ("hardware_price", "lifetime_years")
RESULT_INPUTS: dict[str, tuple[str, ...]] = {
    "electricity_per_mtok": _ELECTRICITY,
    "hardware_per_day": _HARDWARE,
    "capacity_daily_tokens": ("tokens_per_s",),
    "local_per_mtok": (*_ELECTRICITY, *_HARDWARE, "daily_tokens"),
    "cloud_per_mtok": ("cloud_per_mtok",),
    "local_per_day": (*_ELECTRICITY, *_HARDWARE, "daily_tokens"),
    "cloud_per_day": ("daily_tokens", "cloud_per_mtok"),
    "break_even_daily_tokens": (*_ELECTRICITY, *_HARDWARE, "cloud_per_mtok"),
    "months_to_break_even": (*_ELECTRICITY, "hardware_price", "daily_tokens", "cloud_per_mtok"),
}


@dataclass(frozen=True)
class Volume:
    """What the ledger says about the last days' traffic (served requests only)."""

    tokens_in: int
    tokens_out: int
    estimated_tokens: int  # of those, counted from answers that reported no usage
    active_days: int
    days: int  # looked at: from the first record in the window to today, in UTC days


@dataclass(frozen=True)
class CostAnswer:
    currency: str
    inputs: dict[str, Figure]
    result: dict[str, Figure]  # each figure of costs.BreakEven, from the inputs it rests on
    owning_wins: bool
    verdict: str
    defaults: tuple[str, ...]  # the inputs that are built-in defaults
    ledger: Volume | None
    bursty: bool
    app: AppCost | None = None  # with --app: what that app costs here and on the meter


# Where a ledger's groups come from: the file (store.groups), or the operator's page's running
# totals (sovctl.ledger.dashboard.Tally), which count by whole days as the window does.
GroupsOf = Callable[[Path, float, float], list[store.Group]]


def volume(home: Home, now: float, days: int = WINDOW_DAYS,
           groups: GroupsOf = store.groups) -> Volume | None:
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    start = dt.datetime.combine(today - dt.timedelta(days - 1), dt.time(), dt.UTC)
    path = store.ledger_path(home)
    served = [g for g in groups(path, start.timestamp(), now)
              if g.route != store.UNROUTED]
    if not served:
        return None
    first = dt.date.fromisoformat(served[0].day)  # groups come ordered by day
    return Volume(tokens_in=sum(g.tokens_in for g in served),
                  tokens_out=sum(g.tokens_out for g in served),
                  estimated_tokens=sum(g.tokens_in + g.tokens_out for g in served
                                       if g.tokens_source == ESTIMATED),
                  active_days=len({g.day for g in served}),
                  days=(today - first).days + 1)


def _config(settings: Settings, key: str, value: float) -> Figure:
    """The setting `key` (its value `value`) as a figure: where it came from, in words."""
    return Figure(value, setting_source(settings, key), f"{key} ({settings.source(key)})")


def _given(f: Figure) -> float:
    assert f.value is not None  # every input has a value; only a result may have none
    return f.value


def answer(home: Home, settings: Settings, flags: Mapping[str, float | None],
           now: float | None = None, groups: GroupsOf = store.groups) -> CostAnswer:
    """`flags`: hardware_price, lifetime_years, watts, tokens_per_s, tariff, daily_tokens,
    cloud_per_mtok; None where not given."""
    now = time.time() if now is None else now
    seen = volume(home, now, groups=groups)
    total = (seen.tokens_in + seen.tokens_out) if seen else 0
    share_in = seen.tokens_in / total if seen and total else None
    mix = f"the ledger's mix ({share_in:.0%} prompt tokens)" if share_in is not None else ""

    cost = settings.cost
    inputs: dict[str, Figure] = {
        "hardware_price": _config(settings, "cost.hardware_price", cost.hardware_price),
        "lifetime_years": _config(settings, "cost.hardware_lifetime_years",
                                  cost.hardware_lifetime_years),
        "tariff": _config(settings, "cost.electricity_per_kwh", cost.electricity_per_kwh),
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
        inputs["watts"] = Figure(joules / seconds, ESTIMATED if bench.estimated else MEASURED,
                                 how)
        inputs["tokens_per_s"] = Figure(1 / seconds, MEASURED, how)
    else:
        watts = _config(settings, "bench.cpu_watts", settings.bench.cpu_watts)
        inputs["watts"] = Figure(watts.value, watts.source, f"{watts.basis}; no bench run")
        inputs["tokens_per_s"] = Figure(DEFAULT_TOKENS_PER_S, DEFAULTED,
                                        "built-in default; no bench run")
    if seen is not None:
        inputs["daily_tokens"] = Figure(
            total / seen.days, ESTIMATED if seen.estimated_tokens else MEASURED,
            f"ledger, the last {seen.days} day{'s' if seen.days > 1 else ''}")
    else:
        inputs["daily_tokens"] = Figure(0.0, DEFAULTED, "built-in default; nothing in the ledger")
    out = _config(settings, "cost.cloud_price_per_mtok", cost.cloud_price_per_mtok)
    if share_in is not None:
        cin = _config(settings, "cost.cloud_input_price_per_mtok",
                      cost.cloud_input_price_per_mtok)
        inputs["cloud_per_mtok"] = Figure(
            share_in * cost.cloud_input_price_per_mtok
            + (1 - share_in) * cost.cloud_price_per_mtok,
            weakest(cin.source, out.source),
            f"cost.cloud_input_price_per_mtok and cost.cloud_price_per_mtok by {mix}")
    else:
        inputs["cloud_per_mtok"] = out
    for name, value in flags.items():
        if value is not None:
            inputs[name] = Figure(float(value), FLAG, "flag")

    given = costs.BreakEvenInputs(**{k: _given(f) for k, f in inputs.items()})
    math = costs.break_even(given)
    result = {name: Figure(getattr(math, name), weakest(*(inputs[i].source for i in used)),
                           "from " + ", ".join(used))
              for name, used in RESULT_INPUTS.items()}
    # Burstiness is the ledger's to tell: a volume given by flag says nothing of its spread.
    traffic = (costs.Traffic(seen.active_days, seen.days)
               if seen is not None and inputs["daily_tokens"].source != FLAG else None)
    currency = cost.currency
    return CostAnswer(
        currency=currency, inputs=inputs, result=result, owning_wins=math.owning_wins,
        verdict=costs.verdict(given, math, currency, traffic),
        defaults=tuple(k for k, f in inputs.items() if f.source == DEFAULTED), ledger=seen,
        bursty=traffic is not None and traffic.bursty)


@dataclass(frozen=True)
class AppCost:
    """One app's traffic over the window (the ledger's last WINDOW_DAYS days), priced both
    ways: on the meter (its local tokens at the [cost] cloud prices, plus what its frontier
    requests were charged) and here (its local tokens at their models' bench prices, energy
    and amortised hardware, plus the same frontier charges)."""

    name: str
    days: int
    requests: int
    tokens_in: Figure
    tokens_out: Figure
    local_tokens: Figure
    routed_tokens: Figure
    share: Figure  # of all the tokens in the window; value None when there were none
    at_meter: Figure
    here: Figure
    local_cost: Figure
    routed_spend: Figure
    unpriced_tokens: Figure  # local tokens of models never benched: not in local_cost, here
    saved: Figure  # at_meter - here


def app_cost(home: Home, settings: Settings, app: str, now: float | None = None,
             groups: GroupsOf = store.groups) -> AppCost:
    """What app `app` cost over the window, here and on the meter. A NotFoundError for a name
    that is no app: none in the ledger's window, configured ([apps.NAME]) or keyed."""
    now = time.time() if now is None else now
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    start = dt.datetime.combine(today - dt.timedelta(WINDOW_DAYS - 1), dt.time(), dt.UTC)
    found = groups(store.ledger_path(home), start.timestamp(), now)
    mine = [g for g in found if g.app == app]
    if not mine and app not in settings.apps and app != store.DEFAULT_APP \
            and app not in read_app_keys(app_keys_path(home)):
        raise NotFoundError(f"no app {app!r}: none in the ledger's last {WINDOW_DAYS} days, "
                            "in [apps] or among the keys",
                            hint="'sovctl keys list' and 'sovctl ledger --by app' show the apps")
    basis = f"ledger, app {app}, the last {WINDOW_DAYS} days"

    def total(parts: list[tuple[float, bool]], what: str) -> Figure:
        """A sum, estimated when any estimated part of it counts."""
        return Figure(sum(v for v, _ in parts),
                      ESTIMATED if any(e and v for v, e in parts) else MEASURED,
                      f"{basis}: {what}")

    local = [g for g in mine if g.route == "local"]
    routed = [g for g in mine if g.route not in ("local", store.UNROUTED)]
    def tokens(of: list[store.Group], what: str) -> Figure:
        return total([(g.tokens_in + g.tokens_out, g.tokens_source == ESTIMATED) for g in of],
                     what)

    tokens_in = total([(g.tokens_in, g.tokens_source == ESTIMATED) for g in mine],
                      "prompt tokens")
    tokens_out = total([(g.tokens_out, g.tokens_source == ESTIMATED) for g in mine],
                       "generated tokens")
    local_tokens = tokens(local, "tokens served here")
    routed_tokens = tokens(routed, "tokens routed to frontier providers")
    every = sum(g.tokens_in + g.tokens_out for g in found if g.route != store.UNROUTED)
    share = Figure(((local_tokens.value or 0) + (routed_tokens.value or 0)) / every
                   if every else None, weakest(local_tokens.source, routed_tokens.source),
                   f"{basis}: its tokens over everyone's")
    local_cost = total([(g.cost, g.cost_source == ESTIMATED) for g in local if g.priced],
                       "local tokens at their models' bench prices")
    unpriced = tokens([g for g in local if not g.priced], "local tokens of models never benched")
    spend = total([(g.cost, g.cost_source == ESTIMATED) for g in routed],
                  "what frontier providers charged")
    cost = settings.cost
    cloud_source = weakest(setting_source(settings, "cost.cloud_input_price_per_mtok"),
                           setting_source(settings, "cost.cloud_price_per_mtok"))
    metered = sum(g.tokens_in * cost.cloud_input_price_per_mtok
                  + g.tokens_out * cost.cloud_price_per_mtok for g in local) / 1e6
    at_meter = Figure(metered + (spend.value or 0),
                      weakest(local_tokens.source, cloud_source, spend.source) if local
                      else spend.source,
                      "its local tokens at cost.cloud_input_price_per_mtok and "
                      "cost.cloud_price_per_mtok, plus its frontier spend")
    here = Figure((local_cost.value or 0) + (spend.value or 0),
                  weakest(local_cost.source, spend.source),
                  "its local cost plus its frontier spend")
    saved = Figure((at_meter.value or 0) - (here.value or 0),
                   weakest(at_meter.source, here.source), "on the meter less here")
    return AppCost(app, WINDOW_DAYS, sum(g.requests for g in mine), tokens_in, tokens_out,
                   local_tokens, routed_tokens, share, at_meter, here, local_cost, spend,
                   unpriced, saved)
