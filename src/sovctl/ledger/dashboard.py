"""The figures of the pictures: the operator's page (`/ui`), `sovctl cost --chart` and
`sovctl ledger --chart`, read fast from a ledger of any size.

The page asks every few seconds, and a GROUP BY over a million records takes seconds on a
small box, so `Tally` keeps the ledger's groups (what `store.groups` answers) as running totals
of the last WINDOW_DAYS days: built once from the records of those days (the index on `time`),
then each read adds only the records written since (a range of the table's own key, `rowid`)
and reads the folded days' totals (table `daily`, a row per day, route, model, app and source).
When the writer folds records into a day's totals (the size bound), that day is summed again
from the records left of it, so that none counts twice. Its answers are `store.groups`' to the
record, by whole UTC days, so `sovctl ledger`'s report (`report.report`) and `sovctl cost`'s
answer (`cost.answer`) compute every figure from them as they do from the file: one home per
figure.

- local share by day = the report's local tokens / (local + routed tokens) of each day,
                       against LOCAL_TARGET, the seed's 95/5
- the curve          = what owning and the meter cost, summed month by month, from `sovctl
                       cost`'s answer: owning = hardware price + electricity a day x days,
                       the meter = its price a day x days; they cross at its months to break
                       even
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sovctl.bench.costs import DAYS_PER_MONTH
from sovctl.ledger import store
from sovctl.ledger.cost import WINDOW_DAYS, CostAnswer
from sovctl.ledger.figures import Amount, weakest
from sovctl.ledger.report import Day

# The seed's line: at least 95% of tokens served at home, at most 5% routed out.
LOCAL_TARGET = 0.95
# The curve runs over the hardware's lifetime, or on to past the break-even when that comes
# later; never less than a year, never more than ten.
MIN_MONTHS, MAX_MONTHS = 12, 120

_KEY = "date(time, 'unixepoch'), route, model, app, tokens_source, coalesce(cost_source, '')"
_SUMS = "count(*), sum(tokens_in), sum(tokens_out), coalesce(sum(cost), 0)"
_DAILY = ("SELECT day, route, model, app, tokens_source, cost_source, requests, tokens_in,"
          " tokens_out, cost FROM daily WHERE day >= ? ORDER BY 1, 2, 3, 4, 5, 6")
Key = tuple[str, str, str, str, str]  # route, model, app, tokens_source, cost_source (a day's)
Sums = list[float]  # requests, tokens_in, tokens_out, cost


def _day(t: float) -> dt.date:
    return dt.datetime.fromtimestamp(t, dt.UTC).date()


def _midnight(day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()


def window_start(now: float, days: int = WINDOW_DAYS) -> dt.date:
    """The first of the `days` UTC days that end today: `sovctl cost`'s window."""
    return _day(now) - dt.timedelta(days - 1)


class Tally:
    """The groups of a ledger's last `days` days, kept as running totals; thread-safe."""

    def __init__(self, path: Path, days: int = WINDOW_DAYS) -> None:
        self.path = path
        self.days = days
        self._lock = threading.Lock()
        self._file: tuple[int, int] | None = None  # the file summed: device and inode
        self._first = ""  # the first day summed, YYYY-MM-DD
        self._seen = 0  # the highest rowid summed
        self._sums: dict[str, dict[Key, Sums]] = {}  # day -> the records' up to _seen
        self._daily: dict[str, list[tuple[Key, Sums]]] = {}  # day -> its folded totals
        self._built: dict[str, list[store.Group]] = {}  # day -> its groups, until it changes

    def groups(self, path: Path, since: float, until: float) -> list[store.Group]:
        """`store.groups(path, since, until)` by whole days: every group of the days from
        `since`'s to `until`'s (UTC). `since` must fall within the last `days` days; `path`
        is the tally's own (the argument is there to stand in for `store.groups`)."""
        first, last = _day(since).isoformat(), _day(until).isoformat()
        with self._lock:
            self._refresh(until)
            if first < self._first:
                raise ValueError(f"the tally holds the days from {self._first}, not {first}")
            found: list[store.Group] = []
            for day in sorted(d for d in self._sums.keys() | self._daily.keys()
                              if first <= d <= last):
                if day not in self._built:
                    self._built[day] = self._build(day)
                found += self._built[day]
        return found

    def snapshot(self, now: float) -> Snapshot:
        """The window's groups as they are now, read once for several reports to share."""
        return Snapshot(tuple(self.groups(self.path, _midnight(window_start(now, self.days)),
                                          now)))

    def _build(self, day: str) -> list[store.Group]:
        totals = {k: v.copy() for k, v in self._sums.get(day, {}).items()}
        for key, sums in self._daily.get(day, ()):
            into = totals.setdefault(key, [0, 0, 0, 0.0])
            for i in range(4):
                into[i] += sums[i]
        return [store.Group(day, route, model, ts, cs or None, int(n), int(tin), int(tout),
                            c, app)
                for (route, model, app, ts, cs), (n, tin, tout, c) in sorted(totals.items())]

    def _refresh(self, now: float) -> None:
        """Bring the sums up to the file as it is now."""
        first = window_start(now, self.days).isoformat()
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._reset(first, None)
            return
        with store.reading(self.path) as conn:
            if conn is None:
                self._reset(first, None)
                return
            conn.execute("BEGIN")  # one snapshot for every read below
            try:
                # max(rowid) alone is one step down the table's b-tree.
                top = conn.execute("SELECT max(rowid) FROM requests").fetchone()[0] or 0
                daily: dict[str, list[tuple[Key, Sums]]] = {}
                for row in conn.execute(_DAILY, (first,)):
                    daily.setdefault(row[0], []).append((tuple(row[1:6]), list(row[6:])))
                if (st.st_dev, st.st_ino) != self._file or top < self._seen:
                    # A first read, or another file (the old one moved aside).
                    self._reset(first, (st.st_dev, st.st_ino))
                    self._add(conn, "time >= ? AND rowid <= ?", (_midnight(_date(first)), top))
                else:
                    self._window(first)
                    for day in daily.keys() | self._daily.keys():
                        if day >= first and daily.get(day) != self._daily.get(day):
                            self._refold(conn, day)
                    self._add(conn, "rowid > ? AND rowid <= ?", (self._seen, top))
                self._seen, self._daily = top, daily
            finally:
                conn.rollback()

    def _reset(self, first: str, file: tuple[int, int] | None) -> None:
        self._file, self._first, self._seen = file, first, 0
        self._sums, self._daily, self._built = {}, {}, {}

    def _window(self, first: str) -> None:
        """Days gone out of the window are forgotten."""
        if first > self._first:
            self._first = first
            for kept in (self._sums, self._built):
                for day in [d for d in kept if d < first]:
                    del kept[day]

    def _add(self, conn: sqlite3.Connection, where: str, args: tuple[float, ...]) -> None:
        for row in conn.execute(f"SELECT {_KEY}, {_SUMS} FROM requests WHERE {where} "
                                "GROUP BY 1, 2, 3, 4, 5, 6", args):
            day = row[0]
            self._built.pop(day, None)
            sums = self._sums.setdefault(day, {}).setdefault(tuple(row[1:6]), [0, 0, 0, 0.0])
            for i in range(4):
                sums[i] += row[6 + i]

    def _refold(self, conn: sqlite3.Connection, day: str) -> None:
        """Records of `day` were folded into its daily totals since the last read (the size
        bound): the day is summed again from the records left of it, so that none counts
        twice. Records folded before they were summed are in the daily totals alone."""
        self._sums.pop(day, None)
        self._built.pop(day, None)
        start = _midnight(_date(day))
        self._add(conn, "time >= ? AND time < ? AND rowid <= ?",
                  (start, start + 86400, self._seen))


def _date(day: str) -> dt.date:
    return dt.date.fromisoformat(day)


@dataclass(frozen=True)
class Snapshot:
    """A tally's groups at one moment."""

    found: tuple[store.Group, ...]

    def groups(self, path: Path, since: float, until: float) -> list[store.Group]:
        """As `Tally.groups`, from the moment the snapshot was taken."""
        first, last = _day(since).isoformat(), _day(until).isoformat()
        return [g for g in self.found if first <= g.day <= last]

    def by_route(self) -> Snapshot:
        """Its groups summed over models and apps (both named ""): for the figures that need
        neither (the share, the spend, the volume), a fraction of the groups to go through."""
        return self._summed(apps=True)

    def without_models(self) -> Snapshot:
        """Its groups summed over models (named ""): for the figures of an app."""
        return self._summed(apps=False)

    def _summed(self, apps: bool) -> Snapshot:
        totals: dict[tuple[str, str, str, str | None, str], list[float]] = {}
        for g in self.found:
            key = (g.day, g.route, g.tokens_source, g.cost_source, "" if apps else g.app)
            into = totals.setdefault(key, [0, 0, 0, 0.0])
            into[0] += g.requests
            into[1] += g.tokens_in
            into[2] += g.tokens_out
            into[3] += g.cost
        return Snapshot(tuple(
            store.Group(day, route, "", ts, cs, int(n), int(tin), int(tout), c, app)
            for (day, route, ts, cs, app), (n, tin, tout, c) in totals.items()))

    def apps(self) -> dict[str, int]:
        """Its apps, with the tokens of each."""
        tokens: dict[str, int] = {}
        for g in self.found:
            tokens[g.app] = tokens.get(g.app, 0) + g.tokens_in + g.tokens_out
        return tokens


# -- the local share by day ------------------------------------------------------------------------

@dataclass(frozen=True)
class DayShare:
    day: str  # YYYY-MM-DD, UTC
    local_tokens: Amount
    routed_tokens: Amount
    share: Amount  # local / (local + routed); value None on a day without tokens


def share_by_day(days: Sequence[Day]) -> tuple[DayShare, ...]:
    """Each day of a ledger report with its local share of tokens."""
    out = []
    for d in days:
        local, routed = d.local_tokens.value or 0, d.routed_tokens.value or 0
        source = weakest(d.local_tokens.source, d.routed_tokens.source)
        out.append(DayShare(d.day, d.local_tokens, d.routed_tokens,
                            Amount(local / (local + routed) if local + routed else None, source)))
    return tuple(out)


# -- the curve -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """What owning and the meter cost, summed from month 0 to `months[-1]`."""

    currency: str
    months: tuple[int, ...]
    owning: tuple[float, ...]  # the hardware price at month 0, then electricity on top
    metered: tuple[float, ...]  # what the meter would have billed for the same volume
    owning_source: str  # the weakest source of the figures each line rests on
    metered_source: str
    break_even: Amount  # months to break even; value None: never, at this volume
    daily_tokens: Amount  # the volume both lines serve
    owning_wins: bool
    verdict: str


def curve(a: CostAnswer) -> Curve:
    """The cumulative cost of owning against the meter, from `sovctl cost`'s answer."""
    r = a.result
    hardware, per_day = a.inputs["hardware_price"].value, r["hardware_per_day"].value
    local_per_day, meter_per_day = r["local_per_day"].value, r["cloud_per_day"].value
    lifetime = a.inputs["lifetime_years"].value
    assert None not in (hardware, per_day, local_per_day, meter_per_day, lifetime)
    assert hardware is not None and per_day is not None and lifetime is not None
    assert local_per_day is not None and meter_per_day is not None
    # Owned, the hardware is paid at once, then each day costs its electricity alone.
    electricity_per_day = local_per_day - per_day
    even = r["months_to_break_even"]
    span = max(lifetime * 12, (even.value or 0) * 1.2)
    horizon = min(MAX_MONTHS, max(MIN_MONTHS, math.ceil(span)))
    months = tuple(range(horizon + 1))
    return Curve(
        currency=a.currency, months=months,
        owning=tuple(hardware + m * DAYS_PER_MONTH * electricity_per_day for m in months),
        metered=tuple(m * DAYS_PER_MONTH * meter_per_day for m in months),
        owning_source=weakest(r["local_per_day"].source, a.inputs["hardware_price"].source),
        metered_source=r["cloud_per_day"].source,
        break_even=Amount(even.value, even.source),
        daily_tokens=Amount(a.inputs["daily_tokens"].value, a.inputs["daily_tokens"].source),
        owning_wins=a.owning_wins, verdict=a.verdict)
