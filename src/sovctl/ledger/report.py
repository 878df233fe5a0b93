"""`sovctl ledger`: what stayed home, what went out and what it cost, over a period.

- local share       = local tokens (in + out) / all tokens
- spend by provider = the sum of its requests' costs (its prices at the time)
- local cost        = the sum of local requests' costs (latest bench x tariff + hardware),
                      over the requests whose model had a bench; the rest are counted apart
- at cloud price    = local tokens in x cost.cloud_input_price_per_mtok
                      + local tokens out x cost.cloud_price_per_mtok: what the meter would
                      have charged for the volume served at home
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sovctl.errors import UsageError
from sovctl.home import Home
from sovctl.ledger import store

BY = ("day", "model", "route")
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
    tokens_in: int
    tokens_out: int
    local_tokens: int
    routed_tokens: int
    cost: float
    unpriced_tokens: int


@dataclass(frozen=True)
class Day:
    day: str
    local_tokens: int
    routed_tokens: int
    cost: float


@dataclass(frozen=True)
class LedgerReport:
    since: str
    until: str
    by: str
    currency: str
    path: str
    requests: int
    tokens: int
    local_tokens: int
    routed_tokens: int
    local_share: float | None  # None when no tokens were recorded
    spend: dict[str, float]  # provider -> money
    local_cost: float
    local_unpriced_tokens: int  # local tokens of models with no bench: not in local_cost
    local_at_cloud_price: float
    cloud_input_per_mtok: float
    cloud_output_per_mtok: float
    rows: tuple[Row, ...]
    days: tuple[Day, ...]  # every day of the period, oldest first


def _is_local(g: store.Group) -> bool:
    return g.route == "local"


def _is_routed(g: store.Group) -> bool:
    return g.route not in ("local", store.UNROUTED)


def report(home: Home, settings: Any, since: str = "7d", by: str = "day",
           now: float | None = None) -> LedgerReport:
    if by not in BY:
        raise UsageError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    until = time.time() if now is None else now
    start = parse_since(since, until)
    if start >= until:
        raise UsageError(f"--since {since!r} is not in the past")
    path = store.ledger_path(home)
    found = store.groups(path, start, until)
    cloud_in = float(settings.get("cost.cloud_input_price_per_mtok"))
    cloud_out = float(settings.get("cost.cloud_price_per_mtok"))

    local = [g for g in found if _is_local(g)]
    routed = [g for g in found if _is_routed(g)]
    local_tokens = sum(g.tokens_in + g.tokens_out for g in local)
    routed_tokens = sum(g.tokens_in + g.tokens_out for g in routed)
    total = local_tokens + routed_tokens
    spend: dict[str, float] = {}
    for g in routed:
        spend[g.route] = spend.get(g.route, 0.0) + g.cost

    key: Callable[[store.Group], str] = {
        "day": lambda g: g.day, "model": lambda g: g.model, "route": lambda g: g.route}[by]
    rows: dict[str, Row] = {}
    for g in found:
        k = key(g)
        r = rows.get(k) or Row(k, 0, 0, 0, 0, 0, 0.0, 0)
        tokens = g.tokens_in + g.tokens_out
        rows[k] = Row(k, r.requests + g.requests, r.tokens_in + g.tokens_in,
                      r.tokens_out + g.tokens_out,
                      r.local_tokens + (tokens if _is_local(g) else 0),
                      r.routed_tokens + (tokens if _is_routed(g) else 0),
                      r.cost + g.cost, r.unpriced_tokens + g.unpriced_in + g.unpriced_out)

    return LedgerReport(
        since=_iso(start), until=_iso(until), by=by,
        currency=str(settings.get("cost.currency")), path=str(path),
        requests=sum(g.requests for g in found), tokens=total, local_tokens=local_tokens,
        routed_tokens=routed_tokens, local_share=local_tokens / total if total else None,
        spend=dict(sorted(spend.items())),
        local_cost=sum(g.cost for g in local),
        local_unpriced_tokens=sum(g.unpriced_in + g.unpriced_out for g in local),
        local_at_cloud_price=sum(g.tokens_in * cloud_in + g.tokens_out * cloud_out
                                 for g in local) / 1e6,
        cloud_input_per_mtok=cloud_in, cloud_output_per_mtok=cloud_out,
        rows=tuple(sorted(rows.values(), key=lambda r: r.key)),
        days=_days(found, start, until),
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).replace(microsecond=0).isoformat() \
        .replace("+00:00", "Z")


def _days(found: list[store.Group], start: float, until: float) -> tuple[Day, ...]:
    first = dt.datetime.fromtimestamp(start, dt.UTC).date()
    last = dt.datetime.fromtimestamp(until, dt.UTC).date()
    days = {(first + dt.timedelta(n)).isoformat(): Day((first + dt.timedelta(n)).isoformat(),
                                                       0, 0, 0.0)
            for n in range((last - first).days + 1)}
    for g in found:
        d = days[g.day]
        tokens = g.tokens_in + g.tokens_out
        days[g.day] = Day(d.day, d.local_tokens + (tokens if _is_local(g) else 0),
                          d.routed_tokens + (tokens if _is_routed(g) else 0), d.cost + g.cost)
    return tuple(days.values())

