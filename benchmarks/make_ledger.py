"""Write a ledger of N records, as a busy gateway would have, for benchmarks/bench_ui.py.

    .venv/bin/python benchmarks/make_ledger.py /tmp/sovctl-ledger.sqlite3 [--rows 1000000]
        [--days 30] [--seed 0]

The records go through the gateway's own writer (`sovctl.ledger.store.Writer`: the ledger's
schema, its bounds on text, its batches), spread evenly over the last `--days` days up to now:
most served here by three local models, a few routed to two providers, a few refused before
routing; ten apps; some token counts and costs estimated. The file is kept out of the
repository: name a path under /tmp. An existing file is refused, not appended to.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from sovctl.ledger.store import ESTIMATED, MEASURED, UNROUTED, Row, Writer

CHUNK = 100_000  # records handed to one writer: its batch stays a bounded size in memory
LOCAL = (("qwen", "/v1/chat/completions"), ("smol", "/v1/chat/completions"),
         ("minilm", "/v1/embeddings"))
ROUTED = (("openai", "frontier/openai/gpt-4o-mini", 0.15, 0.6),
          ("anthropic", "frontier/anthropic/claude-haiku", 0.8, 4.0))
APPS = ("default", *(f"agent-{n}" for n in range(1, 10)))


def record(rng: random.Random, t: float) -> Row:
    app = APPS[min(int(rng.expovariate(0.5)), len(APPS) - 1)]  # a few apps make most traffic
    source = ESTIMATED if rng.random() < 0.02 else MEASURED  # 2%: a stream cut short
    tokens_in, tokens_out = rng.randint(20, 2000), rng.randint(1, 600)
    pick = rng.random()
    if pick < 0.95:
        model, endpoint = LOCAL[rng.randrange(len(LOCAL))]
        if endpoint == "/v1/embeddings":
            tokens_out = 0
        cost = (tokens_in * 0.02 + tokens_out * 0.09) / 1e6  # a bench's price, say
        return (t, "local", model, endpoint, 200, tokens_in, tokens_out, rng.random(), cost,
                source, source, app)
    if pick < 0.995:
        route, model, price_in, price_out = ROUTED[rng.randrange(len(ROUTED))]
        cost = (tokens_in * price_in + tokens_out * price_out) / 1e6
        return (t, route, model, "/v1/chat/completions", 200, tokens_in, tokens_out,
                rng.random() * 3, cost, source, source, app)
    # Refused before routing (a body that is no JSON, say): no tokens, no cost.
    return (t, UNROUTED, "-", "/v1/chat/completions", 400, 0, 0, 0.001, None, MEASURED, None,
            app)


def make(path: Path, rows: int, days: float, seed: int = 0) -> None:
    if path.exists():
        raise SystemExit(f"{path} exists: name a new file")
    rng = random.Random(seed)
    now = time.time()
    span = days * 86400
    for start in range(0, rows, CHUNK):
        writer = Writer(path, max_rows=max(rows, 1))
        for i in range(start, min(start + CHUNK, rows)):
            writer.put(record(rng, now - span * (1 - i / rows) + rng.random()))
        writer.close(timeout=600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.perf_counter()
    make(args.path, args.rows, args.days, args.seed)
    print(f"{args.rows:,} records over {args.days:g} days in {args.path} "
          f"({args.path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
