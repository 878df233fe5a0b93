"""The ledger's file: its schema, the gateway's batched writer, and the reads.

The gateway must not wait on a disk: a request only puts its record on a queue (never
blocking), and a thread writes what has queued up every FLUSH_S seconds in one transaction.
SQLite in WAL mode lets `sovctl ledger` read while the gateway writes. Records older than
RETENTION_DAYS are deleted when a writer opens the file.

The file is bounded: any client that reaches the gateway adds records, and no disk should
fill up with them. Beyond `max_rows` records (`[ledger] max_rows`), the writer folds the
oldest into per-day totals (table `daily`, one row per day, route, model and source) and
deletes them, so `sovctl ledger` and `sovctl cost` still count them. Text columns are cut to
a fixed length, so a record has a bounded size too.

Every token count and cost says how it was obtained: `measured` (the usage the answer
reported; a bench with a power meter) or `estimated` (a stream that ended without usage, whose
events or characters were counted; a bench whose energy came from bench.cpu_watts).

Every record carries its app (column `app`): the name of the key it came with (`sovctl keys`),
the name a request gave itself where the gateway needs no key, or "default".
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sovctl.config import LedgerSettings
from sovctl.errors import ConfigError
from sovctl.home import Home

# /2: tokens_source and cost_source; the daily totals of folded records. /3: each record's app.
SCHEMA_VERSION = 3
RETENTION_DAYS = 400
FLUSH_S = 0.5
MAX_ROWS = LedgerSettings().max_rows  # [ledger] max_rows's default
# Folding runs again only after this share of max_rows more records: not at every batch.
FOLD_SLACK = 0.01
MAX_MODEL_CHARS = 256
MAX_TEXT_CHARS = 64  # route and endpoint: a provider's name is at most 64 characters
UNROUTED = "-"  # the route of a request refused before it was routed (bad key, bad JSON, ...)
MEASURED, ESTIMATED = "measured", "estimated"
DEFAULT_APP = "default"  # apikey.DEFAULT_APP: the app of records from before apps had keys

# The daily totals of records folded away by the size bound (a template: the migration from
# schema 2 makes the table under another name first).
_DAILY = """
CREATE TABLE IF NOT EXISTS {name} (
    day TEXT NOT NULL,         -- YYYY-MM-DD, UTC
    route TEXT NOT NULL,
    model TEXT NOT NULL,       -- "-" for refused requests that used nothing
    app TEXT NOT NULL,
    tokens_source TEXT NOT NULL,
    cost_source TEXT NOT NULL, -- "" for records without a cost
    requests INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost REAL NOT NULL,
    PRIMARY KEY (day, route, model, app, tokens_source, cost_source)
)"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    time REAL NOT NULL,        -- the request's start, seconds since the epoch
    route TEXT NOT NULL,       -- "local", a provider's name, or "-" when never routed
    model TEXT NOT NULL,       -- as the request named it ("frontier/NAME/MODEL" when routed)
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    cost REAL,                 -- in [cost] currency; NULL when unknown (a model never benched)
    tokens_source TEXT NOT NULL DEFAULT 'measured',  -- measured | estimated
    cost_source TEXT,          -- measured | estimated; NULL with cost
    app TEXT NOT NULL DEFAULT 'default'  -- the app it came from (its key's name)
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
""" + _DAILY.format(name="daily")

# Schema 1 had neither source: its records count as measured, as it presented them.
_MIGRATE_1 = (
    "ALTER TABLE requests ADD COLUMN tokens_source TEXT NOT NULL DEFAULT 'measured'",
    "ALTER TABLE requests ADD COLUMN cost_source TEXT",
    "UPDATE requests SET cost_source = 'measured' WHERE cost IS NOT NULL",
)
# Schema 2 had no apps: every record came with the one key, the default app's. The daily
# totals take the app into their key, so the table is made anew (schema 1 had none: the
# schema makes it).
_ADD_APP = "ALTER TABLE requests ADD COLUMN app TEXT NOT NULL DEFAULT 'default'"
_MIGRATE_2 = (
    _ADD_APP,
    _DAILY.format(name="daily_3"),
    "INSERT INTO daily_3 SELECT day, route, model, 'default', tokens_source, cost_source,"
    " requests, tokens_in, tokens_out, cost FROM daily",
    "DROP TABLE daily",
    "ALTER TABLE daily_3 RENAME TO daily",
)
_MIGRATIONS = {1: (*_MIGRATE_1, _ADD_APP), 2: _MIGRATE_2}

# A refused request that used nothing is folded under model "-": the names a client sends
# are without number, the models that answer are not, and the totals stay bounded.
_FOLD = """
INSERT INTO daily (day, route, model, app, tokens_source, cost_source, requests, tokens_in,
                   tokens_out, cost)
SELECT date(time, 'unixepoch'), route,
       CASE WHEN status < 400 OR tokens_in + tokens_out > 0 OR coalesce(cost, 0) > 0
            THEN model ELSE '-' END,
       app, tokens_source, coalesce(cost_source, ''), count(*), sum(tokens_in),
       sum(tokens_out), coalesce(sum(cost), 0)
FROM requests WHERE time <= ? GROUP BY 1, 2, 3, 4, 5, 6
ON CONFLICT (day, route, model, app, tokens_source, cost_source) DO UPDATE SET
    requests = requests + excluded.requests, tokens_in = tokens_in + excluded.tokens_in,
    tokens_out = tokens_out + excluded.tokens_out, cost = cost + excluded.cost
"""

_INSERT = ("INSERT INTO requests (time, route, model, endpoint, status, tokens_in, tokens_out, "
           "latency_s, cost, tokens_source, cost_source, app) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

# time, route, model, endpoint, status, tokens_in, tokens_out, latency_s, cost,
# tokens_source, cost_source, app
Row = tuple[float, str, str, str, int, int, int, float, float | None, str, str | None, str]

log = logging.getLogger("sovctl.ledger")


def ledger_path(home: Home) -> Path:
    return home.root / "ledger" / "ledger.sqlite3"


def _open(path: Path) -> sqlite3.Connection:
    """The ledger for writing, created (with its schema) when missing, migrated when older."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commit
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, *_MIGRATIONS, SCHEMA_VERSION):
        conn.close()
        raise ConfigError(f"{path} is a ledger of schema {version}, not {SCHEMA_VERSION}",
                          hint="it was written by another sovctl version: move it aside")
    if version in _MIGRATIONS:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            # Read again under the write lock: another process may have migrated it meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for statement in _MIGRATIONS.get(version, ()):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.executescript(_SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


def _bounded(row: Row) -> Row:
    """The row with its text cut to the columns' bounds: a record's size is bounded."""
    return (row[0], row[1][:MAX_TEXT_CHARS], row[2][:MAX_MODEL_CHARS],
            row[3][:MAX_TEXT_CHARS], *row[4:11], row[11][:MAX_TEXT_CHARS])


class Writer:
    """Appends rows off the request path: `put` queues, a thread writes in batches and keeps
    the file within `max_rows` records."""

    def __init__(self, path: Path, max_rows: int = MAX_ROWS) -> None:
        self.path = path
        self.max_rows = max_rows
        self._rows = 0  # records in the file, counted once at open, then kept up to date
        self._queue: queue.SimpleQueue[Row] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sovctl-ledger", daemon=True)
        self._thread.start()

    def put(self, row: Row) -> None:
        self._queue.put(row)  # an unbounded SimpleQueue: never blocks, takes no lock

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def _drain(self) -> list[Row]:
        rows = []
        while True:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                return rows

    def _run(self) -> None:
        try:
            conn = _open(self.path)
            oldest = time.time() - RETENTION_DAYS * 86400
            conn.execute("DELETE FROM requests WHERE time < ?", (oldest,))
            conn.execute("DELETE FROM daily WHERE day < date(?, 'unixepoch')", (oldest,))
            self._rows = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
            self._bound(conn)
        except (sqlite3.Error, OSError, ConfigError) as e:
            # Serving goes on without a ledger; the gateway's log says why.
            log.warning("ledger %s not opened, requests are not recorded: %s", self.path, e)
            return
        with closing(conn):
            # Sleeping between batches, not waking for each record, keeps the thread off the
            # GIL while the gateway is busy.
            while not self._stop.wait(FLUSH_S):
                self._write(conn, self._drain())
            self._write(conn, self._drain())

    def _write(self, conn: sqlite3.Connection, rows: list[Row]) -> None:
        if not rows:
            return
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(_INSERT, [_bounded(r) for r in rows])
        except sqlite3.Error as e:
            log.warning("ledger %s: %d records not written: %s", self.path, len(rows), e)
            return
        self._rows += len(rows)
        try:
            self._bound(conn)
        except sqlite3.Error as e:
            log.warning("ledger %s: the oldest records not folded, tried again at the next "
                        "batch: %s", self.path, e)

    def _bound(self, conn: sqlite3.Connection) -> None:
        """Beyond max_rows, fold the oldest records into their days' totals and delete them,
        with FOLD_SLACK of room left so that the next batches do not fold again at once."""
        excess = self._rows - self.max_rows
        if excess <= 0:
            return
        n = min(excess + int(self.max_rows * FOLD_SLACK), self._rows)
        with conn:
            conn.execute("BEGIN")
            edge = conn.execute("SELECT time FROM requests ORDER BY time LIMIT 1 OFFSET ?",
                                (n - 1,)).fetchone()[0]
            conn.execute(_FOLD, (edge,))
            folded = conn.execute("DELETE FROM requests WHERE time <= ?", (edge,)).rowcount
        self._rows -= folded
        log.info("ledger %s: over %d records, the %d oldest folded into daily totals",
                 self.path, self.max_rows, folded)


# -- reading ------------------------------------------------------------------------------------

@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection | None]:
    """The ledger for reading; None when nothing was ever recorded. A ledger of the previous
    schema is migrated first (what a gateway of this version does when it opens it)."""
    if not path.exists():
        yield None
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version in _MIGRATIONS:
            conn.close()
            _open(path).close()
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        raise ConfigError(f"cannot read the ledger {path}: {e}",
                          hint="move it aside; the gateway starts a new one") from e
    with closing(conn):
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{path} is a ledger of schema {version}, not {SCHEMA_VERSION}",
                              hint="it was written by another sovctl version: move it aside")
        yield conn


@dataclass(frozen=True)
class Group:
    """Requests of one day, route, model and app whose tokens and cost have the same sources,
    summed."""

    day: str  # YYYY-MM-DD, UTC
    route: str
    model: str
    tokens_source: str  # MEASURED | ESTIMATED
    cost_source: str | None  # MEASURED | ESTIMATED; None: the requests have no known cost
    requests: int
    tokens_in: int
    tokens_out: int
    cost: float  # 0 when the cost is unknown
    app: str = DEFAULT_APP

    @property
    def priced(self) -> bool:
        return self.cost_source is not None


def groups(path: Path, since: float, until: float) -> list[Group]:
    """The groups of requests from `since` to `until`; days folded into totals count whole
    when they fall in the period."""
    with reading(path) as conn:
        if conn is None:
            return []
        found = conn.execute(
            "SELECT day, route, model, app, ts, cs, sum(n), sum(tin), sum(tout), sum(c) FROM ("
            " SELECT date(time, 'unixepoch') AS day, route, model, app, tokens_source AS ts,"
            "  coalesce(cost_source, '') AS cs, count(*) AS n, sum(tokens_in) AS tin,"
            "  sum(tokens_out) AS tout, coalesce(sum(cost), 0) AS c"
            " FROM requests WHERE time >= ? AND time < ? GROUP BY 1, 2, 3, 4, 5, 6"
            " UNION ALL"
            " SELECT day, route, model, app, tokens_source, cost_source, requests, tokens_in,"
            "  tokens_out, cost FROM daily"
            " WHERE day >= date(?, 'unixepoch') AND day <= date(?, 'unixepoch')"
            ") GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6",
            (since, until, since, until)).fetchall()
    return [Group(day, route, model, ts, cs or None, n, tin, tout, c, app)
            for day, route, model, app, ts, cs, n, tin, tout, c in found]


def spent_since(path: Path, since: float) -> dict[str, float]:
    """Money spent per provider since a time (a daily cap's day, when the gateway starts),
    estimated costs included: the provider bills what it generated, reported or not."""
    with reading(path) as conn:
        if conn is None:
            return {}
        found = conn.execute(
            "SELECT route, sum(c) FROM ("
            " SELECT route, cost AS c FROM requests WHERE time >= ? AND cost IS NOT NULL"
            " UNION ALL"
            " SELECT route, cost FROM daily WHERE day >= date(?, 'unixepoch')"
            ") WHERE route NOT IN (?, ?) GROUP BY route",
            (since, since, "local", UNROUTED)).fetchall()
    return {route: float(cost) for route, cost in found}


@dataclass(frozen=True)
class AppDay:
    """What an app used since a time (the start of a UTC day): what its limits count."""

    tokens: int  # prompt and generated, on every route
    frontier_cost: float  # money spent on frontier routes, estimates included


def app_usage_since(path: Path, since: float) -> dict[str, AppDay]:
    """Each app's tokens and frontier spend since `since`, days folded counted whole: what a
    gateway's apps have used of today's limits when it starts."""
    with reading(path) as conn:
        if conn is None:
            return {}
        found = conn.execute(
            "SELECT app, sum(t), sum(CASE WHEN route NOT IN (?, ?) THEN c ELSE 0 END) FROM ("
            " SELECT app, route, tokens_in + tokens_out AS t, coalesce(cost, 0) AS c"
            " FROM requests WHERE time >= ?"
            " UNION ALL"
            " SELECT app, route, tokens_in + tokens_out, cost FROM daily"
            " WHERE day >= date(?, 'unixepoch')"
            ") GROUP BY app", ("local", UNROUTED, since, since)).fetchall()
    return {app: AppDay(int(tokens), float(cost)) for app, tokens, cost in found}


@dataclass(frozen=True)
class Routed:
    """A request the gateway routed to a provider, and when it was in flight."""

    route: str
    model: str
    status: int
    start: float
    end: float


def routed(path: Path) -> list[Routed]:
    """The routed requests still on record one by one (folded ones have no time left)."""
    with reading(path) as conn:
        if conn is None:
            return []
        found = conn.execute(
            "SELECT route, model, status, time, time + latency_s FROM requests "
            "WHERE route NOT IN (?, ?) ORDER BY time", ("local", UNROUTED)).fetchall()
    return [Routed(*row) for row in found]
