"""What a key per app costs a request: requests with an app's key, among 1,000 app keys and
held to the app's limits, against requests with no key, through the same gateway in one run.

Target (issue 23): key lookup and limits add at most 0.5 ms to the median embedding request.

One stack serves the embedding model, its home holding 1,000 app keys (made by
`sovctl.apikey`, as `sovctl keys add` makes them) and [apps.bench] with every limit (set high
enough never to refuse). On loopback the gateway needs no key, so the same gateway, runtime
and connection serve both kinds of request, taking turns: one without a key (the app
"default", which has no limits: no key is looked up, no limit checked) and one with app
bench's key (the key files stat'ed, the key hashed and found among the thousand, then the
concurrency, rate and token checks, and the app's counts). Two stacks, one with keys and one
without, would compare two runtimes as well, whose difference on a shared 2-core machine is
larger than the one measured. The embedding runtime called directly is measured alongside,
for the gateway's whole overhead. Exits 1 when the target is missed.

    .venv/bin/python benchmarks/bench_apps.py [--requests 1000] [--keys 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

# benchmarks/ is on the path of a script run from it
from bench_runtime import EMBED_MODEL, EMBED_TEXT, Target, Verdicts, sovctl

TARGET_MS = 0.5
LIMITS = """
[apps.bench]
requests_per_minute = 10000000
tokens_per_day = 1000000000000
max_concurrent = 64
"""


@contextmanager
def embedding_stack(home: Path) -> Iterator[dict[str, Any]]:
    """A running stack serving only the embedding model; yields its status document."""
    from sovctl.runtime.ports import free_port

    sovctl(home, "pull", str(EMBED_MODEL), "--name", "minilm")
    port = free_port()
    sovctl(home, "serve", "--embedding", "minilm", "--port", str(port), "-d")
    try:
        status = json.loads(sovctl(home, "--json", "status"))["data"]
        status["gateway"] = f"http://127.0.0.1:{port}"
        yield status
    finally:
        sovctl(home, "stop")


def runtime_target(name: str, home: Path, status: dict[str, Any]) -> Target:
    emb = next(p for p in status["processes"] if p["name"] == "minilm")
    key = (home / "run" / "keys" / "minilm.key").read_text().strip()
    return Target(name, f"http://127.0.0.1:{emb['port']}", {"authorization": f"Bearer {key}"})


def latency(targets: list[Target], n: int, warm_up: int = 20) -> dict[str, list[float]]:
    """Single requests over one kept-alive connection, the targets taking turns, each round
    starting one further along, so every target is in every place of the order as often (the
    request before one leaves the runtime and the caches in a state of its own)."""
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    body = {"model": "minilm", "input": EMBED_TEXT}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for i in range(n + warm_up):
            k = i % len(targets)
            for t in targets[k:] + targets[:k]:
                t0 = time.perf_counter()
                client.post(t.base + "/v1/embeddings", json=body,
                            headers=t.headers).raise_for_status()
                if i >= warm_up:
                    times[t.name].append(time.perf_counter() - t0)
    return times


def main() -> int:
    from sovctl.apikey import add_app_key
    from sovctl.home import Home

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="latency requests per kind")
    ap.add_argument("--keys", type=int, default=1000, help="app keys defined")
    a = ap.parse_args()
    v = Verdicts()
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-") as tmp_name, ExitStack() as stacks:
        home = Path(tmp_name) / "home"
        home.mkdir()
        (home / "sovctl.toml").write_text(LIMITS)
        t0 = time.perf_counter()
        key, _ = add_app_key(Home(home), "bench")
        for i in range(a.keys - 1):
            add_app_key(Home(home), f"app-{i:04d}")
        made = time.perf_counter() - t0
        st = stacks.enter_context(embedding_stack(home))
        targets = [Target("no key", st["gateway"], {}),
                   Target("app key", st["gateway"], {"authorization": f"Bearer {key}"}),
                   runtime_target("runtime", home, st)]
        lat = latency(targets, a.requests)
        metrics = httpx.get(st["gateway"] + "/metrics", timeout=10).text
    served = 'sovctl_app_requests_total{app="bench",code="200"} '
    counted = next((int(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith(served)), 0)
    if counted < a.requests:
        print(f"the gateway booked {counted} requests to app bench, not {a.requests}+: the "
              "keyed requests did not take the key path")
        return 1
    ms = {name: statistics.median(times) * 1000 for name, times in lat.items()}
    diff = ms["app key"] - ms["no key"]
    # The same figure from the rounds' own differences: less moved by the machine's load,
    # which changes between rounds more than within one.
    paired = statistics.median(k - n for k, n in zip(lat["app key"], lat["no key"],
                                                     strict=True)) * 1000
    print(f"{a.keys} app keys made in {made:.1f} s; embedding latency, median of {a.requests} "
          "per kind (one kept-alive connection, taking turns):")
    print(f"  runtime directly {ms['runtime']:.3f} ms; through the gateway: no key "
          f"{ms['no key']:.3f} ms (+{ms['no key'] - ms['runtime']:.3f}), app key among "
          f"{a.keys} with its limits {ms['app key']:.3f} ms")
    verdict = v.check(diff <= TARGET_MS, "key lookup and limits")
    print(f"key lookup and limits: {diff:+.3f} ms at the median (<= {TARGET_MS}), ratio "
          f"{ms['app key'] / ms['no key']:.3f}; median of the rounds' differences "
          f"{paired:+.3f} ms {verdict}")
    print("\n" + ("all targets met" if not v.missed else "MISSED: " + ", ".join(v.missed)))
    return 1 if v.missed else 0


if __name__ == "__main__":
    sys.exit(main())
