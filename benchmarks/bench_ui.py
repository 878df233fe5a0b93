"""The operator's page's data (`GET /ui/data.json`) on a ledger of a million records: under 50 ms.

    .venv/bin/python benchmarks/bench_ui.py [--rows 1000000] [--polls 30]
        [--ledger /tmp/sovctl-bench-ledger-1000000.sqlite3]

The ledger is made by benchmarks/make_ledger.py when the file is missing (and kept, out of the
repository, for the next run), its records spread over 29 days: all inside the page's window,
the most it has to read; a copy goes into a temporary home. The gateway runs as `python
-m sovctl.gateway` runs it (its uvicorn configuration), in a thread, on loopback; it needs no
model, the page's figures being the ledger's. Measured, over real HTTP:

- the first answer, which builds the page's running totals from the window's records;
- `--polls` answers, each after 100 more records were written through the gateway's writer
  (a gateway under traffic): the median is the figure, against the 50 ms target;
- one answer after the writer folded the oldest records into daily totals (the size bound);
- the baseline, in the same process: the same figures computed the way `sovctl ledger` and
  `sovctl cost` compute them, by a GROUP BY over the file each time. The ratio is the page's
  median over it.

Exit status 1 when the median misses the target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from make_ledger import make, record  # benchmarks/ is on the path of a script run from it
from sovctl import config
from sovctl.gateway import server
from sovctl.home import Home
from sovctl.ledger import cost, dashboard, report, store
from sovctl.runtime.documents import Limits, RoutesTable

TARGET_MS = 50.0
TRAFFIC = 100  # records written between two polls


@contextmanager
def serving(table: RoutesTable) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(server.config(table))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not srv.started:
            raise SystemExit("the gateway did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def traffic(path: Path, n: int, max_rows: int) -> None:
    """`n` records of now, through the gateway's writer."""
    import random

    rng = random.Random()
    writer = store.Writer(path, max_rows=max_rows)
    for _ in range(n):
        writer.put(record(rng, time.time()))
    writer.close(timeout=600)


def poll(client: httpx.Client) -> tuple[float, float]:
    """(ms over HTTP, ms the gateway says it took to assemble)."""
    started = time.perf_counter()
    r = client.get("/ui/data.json")
    took = (time.perf_counter() - started) * 1000
    r.raise_for_status()
    return took, float(r.json()["elapsed_ms"])


def baseline(home: Home, settings: config.Settings) -> float:
    """ms for the same ledger figures as `sovctl ledger` and `sovctl cost` compute them."""
    started = time.perf_counter()
    now = time.time()
    first = dashboard.window_start(now).isoformat()
    window = report.report(home, settings, since=first, by="route", now=now)
    report.report(home, settings, since=dashboard.window_start(now, 1).isoformat(), now=now)
    since = dt.datetime.combine(dashboard.window_start(now), dt.time(), dt.UTC).timestamp()
    for app in sorted({g.app for g in store.groups(store.ledger_path(home), since, now)}):
        cost.app_cost(home, settings, app, now)
    dashboard.curve(cost.answer(home, settings, {}, now))
    dashboard.share_by_day(window.days)
    return (time.perf_counter() - started) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--polls", type=int, default=30)
    ap.add_argument("--ledger", type=Path, default=None)
    args = ap.parse_args()
    made = args.ledger or Path(tempfile.gettempdir()) / f"sovctl-bench-ledger-{args.rows}.sqlite3"
    if not made.exists():
        # 29 days: every record inside the page's window of 30 (today's included), the most
        # it reads when it starts, and the fold below lands in it.
        print(f"making {made} ({args.rows:,} records over 29 days) ...", flush=True)
        make(made, args.rows, 29)
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-ui-") as tmp:
        home = Home(Path(tmp))
        path = store.ledger_path(home)
        path.parent.mkdir(parents=True)
        shutil.copyfile(made, path)
        rows = args.rows
        table = RoutesTable("127.0.0.1", 0, False, "", Limits(4, 10.0, 1 << 20),
                            str(home.run / "state.json"), routes=(), ledger=str(path),
                            ledger_max_rows=rows, home=str(home.root))
        settings = config.load(home)
        with serving(table) as base, httpx.Client(base_url=base, timeout=120) as client:
            first, _ = poll(client)
            times, assembling = [], []
            for _ in range(args.polls):
                traffic(path, TRAFFIC, rows * 2)  # no fold: room to spare
                took, assembled = poll(client)
                times.append(took)
                assembling.append(assembled)
            # Beyond max_rows the writer folds the oldest 1% into daily totals; when they are
            # of a day inside the window, the page sums what is left of that day again.
            with store.reading(path) as conn:
                assert conn is not None
                oldest = conn.execute("SELECT min(time) FROM requests").fetchone()[0]
            fold_day = dt.datetime.fromtimestamp(oldest, dt.UTC).date()
            inside = fold_day >= dashboard.window_start(time.time())
            traffic(path, TRAFFIC, rows)
            folded, _ = poll(client)
            base_ms = statistics.median(baseline(home, settings) for _ in range(3))
    median = statistics.median(times)
    print(f"ledger: {rows:,} records; {args.polls} polls, {TRAFFIC} new records before each")
    print(f"first answer (builds the running totals)  {first:8.1f} ms")
    print(f"each poll: median {median:.1f} ms over HTTP ({statistics.median(assembling):.1f} ms "
          f"assembling), slowest {max(times):.1f} ms")
    print(f"the poll after a fold of the oldest 1%     {folded:8.1f} ms (records of {fold_day}, "
          f"{'inside' if inside else 'before'} the page's window)")
    print(f"baseline (GROUP BY over the file, as the CLI) {base_ms:8.1f} ms; "
          f"ratio {median / base_ms:.2g}")
    ok = median <= TARGET_MS
    print(f"median {median:.1f} ms vs target {TARGET_MS:.0f} ms: {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
