"""The ledger's file: its schema, the gateway's batched writer, and the reads.

The gateway must not wait on a disk: a request only puts its record on a queue (never
blocking), and a thread writes what has queued up every FLUSH_S seconds in one transaction.
SQLite in WAL mode lets `sovctl ledger` read while the gateway writes. Records older than
RETENTION_DAYS are deleted when a writer opens the file.
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

from sovctl.errors import ConfigError
from sovctl.home import Home

SCHEMA_VERSION = 1
RETENTION_DAYS = 400
FLUSH_S = 0.5
UNROUTED = "-"  # the route of a request refused before it was routed (bad key, bad JSON, ...)

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
    cost REAL                  -- in [cost] currency; NULL when unknown (a model never benched)
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
"""

# time, route, model, endpoint, status, tokens_in, tokens_out, latency_s, cost
Row = tuple[float, str, str, str, int, int, int, float, float | None]

log = logging.getLogger("sovctl.ledger")


def ledger_path(home: Home) -> Path:
    return home.root / "ledger" / "ledger.sqlite3"


def _open(path: Path) -> sqlite3.Connection:
    """The ledger for writing, created (with its schema) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commit
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        conn.close()
        raise ConfigError(f"{path} is a ledger of schema {version}, not {SCHEMA_VERSION}",
                          hint="it was written by another sovctl version: move it aside")
    conn.executescript(_SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


class Writer:
    """Appends rows off the request path: `put` queues, a thread writes in batches."""

    def __init__(self, path: Path) -> None:
        self.path = path
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
            conn.execute("DELETE FROM requests WHERE time < ?",
                         (time.time() - RETENTION_DAYS * 86400,))
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
                conn.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            log.warning("ledger %s: %d records not written: %s", self.path, len(rows), e)


# -- reading ------------------------------------------------------------------------------------

@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection | None]:
    """The ledger for reading; None when nothing was ever recorded."""
    if not path.exists():
        yield None
        return
    try:
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
    """Requests of one day, route and model, summed."""

    day: str  # YYYY-MM-DD, UTC
    route: str
    model: str
    requests: int
    tokens_in: int
    tokens_out: int
    cost: float  # of the requests whose cost is known
    unpriced_in: int  # tokens of requests with no known cost
    unpriced_out: int


def groups(path: Path, since: float, until: float) -> list[Group]:
    with reading(path) as conn:
        if conn is None:
            return []
        found = conn.execute(
            "SELECT date(time, 'unixepoch'), route, model, count(*), sum(tokens_in), "
            "sum(tokens_out), coalesce(sum(cost), 0), "
            "sum(CASE WHEN cost IS NULL THEN tokens_in ELSE 0 END), "
            "sum(CASE WHEN cost IS NULL THEN tokens_out ELSE 0 END) "
            "FROM requests WHERE time >= ? AND time < ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (since, until)).fetchall()
    return [Group(*row) for row in found]


def spent_since(path: Path, since: float) -> dict[str, float]:
    """Money spent per provider since a time (a daily cap's day, when the gateway starts)."""
    with reading(path) as conn:
        if conn is None:
            return {}
        found = conn.execute(
            "SELECT route, sum(cost) FROM requests WHERE time >= ? AND route NOT IN (?, ?) "
            "AND cost IS NOT NULL GROUP BY route", (since, "local", UNROUTED)).fetchall()
    return {route: float(cost) for route, cost in found}


@dataclass(frozen=True)
class Routed:
    """A request the gateway routed to a provider, and when it was in flight."""

    route: str
    model: str
    status: int
    start: float
    end: float


def routed(path: Path) -> list[Routed]:
    with reading(path) as conn:
        if conn is None:
            return []
        found = conn.execute(
            "SELECT route, model, status, time, time + latency_s FROM requests "
            "WHERE route NOT IN (?, ?) ORDER BY time", ("local", UNROUTED)).fetchall()
    return [Routed(*row) for row in found]


def first_time(path: Path, since: float) -> float | None:
    with reading(path) as conn:
        if conn is None:
            return None
        value = conn.execute("SELECT min(time) FROM requests WHERE time >= ?",
                             (since,)).fetchone()[0]
    return float(value) if value is not None else None
