"""`sovctl ledger`: what stayed home, what went out and what it cost, over a period.

- local share       = local tokens (in + out) / all tokens
- spend by provider = the sum of its requests' costs (its prices at the time)
- local cost        = the sum of local requests' costs (latest bench x tariff + hardware),
                      over the requests whose model had a bench; the rest are counted apart
- at cloud price    = local tokens in x cost.cloud_input_price_per_mtok
                      + local tokens out x cost.cloud_price_per_mtok: what the meter would
                      have charged for the volume served at home
Each figure comes with its source (`sovctl.ledger.figures`): a sum is estimated when any
record in it was (tokens counted from a stream without usage, a cost from estimated energy).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sovctl.config import Settings
from sovctl.errors import UsageError
from sovctl.home import Home
from sovctl.ledger import store
from sovctl.ledger.figures import Amount, Sums, setting_source, weakest

BY = ("day", "model", "route", "app")
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([mhdw])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """The start of a period: a span back from now (30m, 24h, 7d, 2w) or a UTC date."""
    m = _SPAN.fullmatch(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        day = dt.date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--since {text!r} is neither a span nor a date",
                         hint="e.g. 24h, 7d, 2w or 2025-01-31 (UTC)") from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True)
class Row:
    """One group of --by; the field names are the columns."""

    key: str
    requests: int
    tokens_in: Amount
    tokens_out: Amount
    local_tokens: Amount
    routed_tokens: Amount
    cost: Amount
    unpriced_tokens: Amount


@dataclass(frozen=True)
class Day:
    day: str
    local_tokens: Amount
    routed_tokens: Amount
    cost: Amount


@dataclass(frozen=True)
class Estimates:
    """How much of the period's figures rests on estimates."""

    tokens: int  # counted from streams that reported no usage, or a prompt's size
    cost: float  # priced from those tokens, or from a bench's estimated energy


@dataclass(frozen=True)
class LedgerReport:
    since: str
    until: str
    by: str
    currency: str
    path: str
    requests: int
    tokens: Amount
    local_tokens: Amount
    routed_tokens: Amount
    local_share: Amount  # value None when no tokens were recorded
    spend: dict[str, Amount]  # provider -> money
    local_cost: Amount
    local_unpriced_tokens: Amount  # local tokens of models with no bench: not in local_cost
    local_at_cloud_price: Amount
    cloud_input_per_mtok: Amount
    cloud_output_per_mtok: Amount
    estimated: Estimates
    rows: tuple[Row, ...]
    days: tuple[Day, ...]  # every day of the period, oldest first


def _is_local(g: store.Group) -> bool:
    return g.route == "local"


def _is_routed(g: store.Group) -> bool:
    return g.route not in ("local", store.UNROUTED)


def _sum(groups: Iterable[store.Group]) -> Sums:
    """The figures of a row (or a day, or the period) over its groups."""
    s = Sums()
    for g in groups:
        est_tokens = g.tokens_source == store.ESTIMATED
        tokens = g.tokens_in + g.tokens_out
        s.add("tokens_in", g.tokens_in, est_tokens)
        s.add("tokens_out", g.tokens_out, est_tokens)
        s.add("local_tokens", tokens if _is_local(g) else 0, est_tokens)
        s.add("routed_tokens", tokens if _is_routed(g) else 0, est_tokens)
        s.add("cost", g.cost, g.cost_source == store.ESTIMATED)
        s.add("unpriced_tokens", 0 if g.priced else tokens, est_tokens)
    return s


def report(home: Home, settings: Settings, since: str = "7d", by: str = "day",
           now: float | None = None,
           groups: Callable[[Path, float, float], list[store.Group]] = store.groups
           ) -> LedgerReport:
    """`groups`: where the groups come from (the operator's page passes its running totals,
    `sovctl.ledger.dashboard.Tally`, by whole days)."""
    if by not in BY:
        raise UsageError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    until = time.time() if now is None else now
    start = parse_since(since, until)
    if start >= until:
        raise UsageError(f"--since {since!r} is not in the past")
    path = store.ledger_path(home)
    found = groups(path, start, until)
    cin = settings.cost.cloud_input_price_per_mtok
    cout = settings.cost.cloud_price_per_mtok
    cloud_in = Amount(cin, setting_source(settings, "cost.cloud_input_price_per_mtok"))
    cloud_out = Amount(cout, setting_source(settings, "cost.cloud_price_per_mtok"))

    everything = _sum(found)
    local = _sum(g for g in found if _is_local(g))
    spend = {route: _sum(g for g in found if g.route == route).get("cost")
             for route in sorted({g.route for g in found if _is_routed(g)})}
    local_tokens, routed_tokens = everything.get("local_tokens"), everything.get("routed_tokens")
    total = everything.value("local_tokens") + everything.value("routed_tokens")
    share = Amount(everything.value("local_tokens") / total if total else None,
                   weakest(local_tokens.source, routed_tokens.source))
    at_cloud = Amount(sum(g.tokens_in * cin + g.tokens_out * cout
                          for g in found if _is_local(g)) / 1e6,
                      weakest(local_tokens.source, cloud_in.source, cloud_out.source))

    key: Callable[[store.Group], str] = {
        "day": lambda g: g.day, "model": lambda g: g.model, "route": lambda g: g.route,
        "app": lambda g: g.app}[by]
    rows = []
    for k in sorted({key(g) for g in found}):
        mine = [g for g in found if key(g) == k]
        s = _sum(mine)
        rows.append(Row(k, sum(g.requests for g in mine), s.get("tokens_in"), s.get("tokens_out"),
                        s.get("local_tokens"), s.get("routed_tokens"), s.get("cost"),
                        s.get("unpriced_tokens")))

    return LedgerReport(
        since=_iso(start), until=_iso(until), by=by,
        currency=settings.cost.currency, path=str(path),
        requests=sum(g.requests for g in found),
        tokens=Amount(total, weakest(local_tokens.source, routed_tokens.source)),
        local_tokens=local_tokens, routed_tokens=routed_tokens, local_share=share,
        spend=spend, local_cost=local.get("cost"),
        local_unpriced_tokens=local.get("unpriced_tokens"), local_at_cloud_price=at_cloud,
        cloud_input_per_mtok=cloud_in, cloud_output_per_mtok=cloud_out,
        estimated=Estimates(
            tokens=sum(g.tokens_in + g.tokens_out for g in found
                       if g.tokens_source == store.ESTIMATED),
            cost=sum(g.cost for g in found if g.cost_source == store.ESTIMATED)),
        rows=tuple(rows),
        days=_days(found, start, until),
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).replace(microsecond=0).isoformat() \
        .replace("+00:00", "Z")


def _days(found: list[store.Group], start: float, until: float) -> tuple[Day, ...]:
    first = dt.datetime.fromtimestamp(start, dt.UTC).date()
    last = dt.datetime.fromtimestamp(until, dt.UTC).date()
    days = []
    for n in range((last - first).days + 1):
        day = (first + dt.timedelta(n)).isoformat()
        s = _sum(g for g in found if g.day == day)
        days.append(Day(day, s.get("local_tokens"), s.get("routed_tokens"), s.get("cost")))
    return tuple(days)
