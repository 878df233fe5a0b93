"""The gateway's Messages and Responses surfaces against its Chat Completions, in one run.

Targets (issue 20), a local chat model on llama-server:
  - a short non-streamed request (one token) adds at most 1 ms at the median on /v1/messages
    and on /v1/responses, against the same request as /v1/chat/completions through the gateway;
  - streaming tokens/s at 1 and 4 clients on each surface >= 0.95x Chat Completions' through
    the gateway;
  - the same streams >= 0.95x llama-server's own /v1/messages and /v1/responses called
    directly (llama-server started by hand with the chat runtime's argv from sovctl's plan).
For the record: each surface called on llama-server directly, and Responses with store: false
(the default keeps each response for previous_response_id).

Every request asks for the same work: the same prompts, temperature 0 and, for streams, a
fixed number of tokens (llama-server's ignore_eos). Tokens are counted from each surface's
own stream events (chat deltas, Messages text_delta, Responses output_text.delta). The paths
take turns, each round starting with another one, and a ratio is the median of the rounds'
own ratios; latency is the median over many kept-alive requests, the paths interleaved.
Exits 1 when a target is missed.

    .venv/bin/python benchmarks/bench_surfaces.py [--rounds 10] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# benchmarks/ is on the path of a script run from it
from bench_runtime import (
    CHAT_MODEL,
    PROMPTS,
    Burst,
    Stream,
    Target,
    Verdicts,
    chat_client,
    compare,
    direct_llama_server,
    rounds_line,
    stack,
)

ENDPOINTS = {"chat": "/v1/chat/completions", "messages": "/v1/messages",
             "responses": "/v1/responses"}
LEVELS = (1, 4)
LATENCY_PROMPT = "Say hello."
WARM_UP = 20  # latency requests per path left out: connections, caches


@dataclass(frozen=True)
class Route:
    """One surface of one server: where a request goes and how it is said."""

    name: str
    surface: str
    target: Target
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def url(self) -> str:
        return self.target.base + ENDPOINTS[self.surface]


def request(path: Route, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """The same request as the path's surface says it."""
    body: dict[str, Any] = {"model": "smol", "stream": stream, "temperature": 0,
                            # Equal work on every request (llama-server's flags).
                            "ignore_eos": True, "min_tokens": max_tokens}
    if path.surface == "responses":
        body |= {"input": prompt, "max_output_tokens": max_tokens}
    else:
        body |= {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    return body | dict(path.extra)


def read_event(surface: str, event: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(a token, the stream's proper end, an error) in one event of the surface's stream."""
    if surface == "chat":
        choice = (event.get("choices") or [{}])[0]
        return (bool(choice.get("delta", {}).get("content")), False, "error" in event)
    kind = event.get("type")
    if surface == "messages":
        delta = event.get("delta") or {}
        return (kind == "content_block_delta" and delta.get("type") == "text_delta"
                and bool(delta.get("text")), kind == "message_stop", kind == "error")
    return (kind == "response.output_text.delta" and bool(event.get("delta")),
            kind == "response.completed", kind in ("error", "response.failed"))


async def stream_one(client: httpx.AsyncClient, path: Route, i: int, max_tokens: int
                     ) -> Stream:
    body = request(path, PROMPTS[i % len(PROMPTS)], max_tokens, True)
    tokens, ttft, done, ok = 0, 0.0, False, False
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", path.url, json=body,
                                 headers=path.target.headers) as r:
            ok = r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    token, end, failed = read_event(path.surface, json.loads(line[6:]))
                    if token:
                        tokens += 1
                        if tokens == 1:
                            ttft = time.perf_counter() - t0
                    done = done or end
                    ok = ok and not failed
    except httpx.TransportError:
        ok = False  # counted as incomplete
    return Stream(tokens, ttft, time.perf_counter() - t0, ok and done)


async def burst(client: httpx.AsyncClient, path: Route, clients: int, max_tokens: int
                ) -> Burst:
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(stream_one(client, path, i, max_tokens)
                                     for i in range(clients)))
    return Burst(list(streams), time.perf_counter() - t0)


def turn(paths: list[Route], r: int) -> list[Route]:
    """Round r's order: each round starts with the next path."""
    k = r % len(paths)
    return paths[k:] + paths[:k]


async def stream_rounds(paths: list[Route], rounds: int, max_tokens: int
                        ) -> dict[tuple[str, int], list[Burst]]:
    out: dict[tuple[str, int], list[Burst]] = {}
    clients = {p.name: chat_client() for p in paths}
    try:
        for p in paths:  # warm-up: fills each server's prompt cache the same way
            await burst(clients[p.name], p, max(LEVELS), 4)
        for level in LEVELS:
            for r in range(rounds):
                for p in turn(paths, r):
                    b = await burst(clients[p.name], p, level, max_tokens)
                    out.setdefault((p.name, level), []).append(b)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


async def latency(paths: list[Route], n: int) -> dict[str, list[float]]:
    """One-token answers, not streamed, over one kept-alive connection per path, the paths
    taking turns."""
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = {p.name: httpx.AsyncClient(timeout=60, limits=limits, trust_env=False)
               for p in paths}
    bodies = {p.name: json.dumps(request(p, LATENCY_PROMPT, 1, False)).encode() for p in paths}
    try:
        for i in range(n + WARM_UP):
            for p in turn(paths, i):
                headers = {**p.target.headers, "content-type": "application/json"}
                t0 = time.perf_counter()
                r = await clients[p.name].post(p.url, content=bodies[p.name], headers=headers)
                seconds = time.perf_counter() - t0
                if r.status_code != 200:
                    raise SystemExit(f"{p.name}: {r.status_code} {r.text[:300]}")
                if i >= WARM_UP:
                    times[p.name].append(seconds)
    finally:
        for c in clients.values():
            await c.aclose()
    return times


# -- reporting -----------------------------------------------------------------------------------
def report_latency(times: dict[str, list[float]], n: int, v: Verdicts) -> None:
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"\none-token answer, not streamed: median of {n} kept-alive requests a path (ms)")
    print(f"{'surface':>22} {'llama-server':>12} {'gateway':>8} {'gateway adds':>12} "
          f"{'vs chat':>8} {'target':>7}")
    for surface in ENDPOINTS:
        direct, ours = ms[f"{surface} direct"], ms[surface]
        line = (f"{surface:>22} {direct:12.2f} {ours:8.2f} {ours - direct:+12.2f} ")
        if surface == "chat":
            print(line)
            continue
        added = ours - ms["chat"]
        # The median of the turns' own differences beside: a turn's requests follow each other.
        paired = statistics.median(o - c for o, c in zip(times[surface], times["chat"],
                                                         strict=True)) * 1000
        print(line + f"{added:+8.2f} {'<= 1':>7} "
              f"{v.check(added <= 1, f'{surface} latency added')}  (paired {paired:+.2f})")
    off = ms["responses store:false"]
    print(f"{'responses store:false':>22} {'':>12} {off:8.2f} {'':>12} {off - ms['chat']:+8.2f}"
          "  (for the record)")


def report_streams(results: dict[tuple[str, int], list[Burst]], v: Verdicts) -> None:
    rounds = len(results[("chat", 1)])
    print(f"\nstreaming, total tokens/s: medians of {rounds} rounds, and of the rounds' ratios "
          "(the best rounds' ratio beside)")
    print(f"{'clients':>7} {'surface':>10} {'baseline':>18} {'base':>7} {'gateway':>8} "
          f"{'ratio':>6} {'target':>7}")
    for level in LEVELS:
        for surface in ("messages", "responses"):
            for base in ("chat", f"{surface} direct"):
                shown = "chat (gateway)" if base == "chat" else "llama-server"
                b, ours, ratio, best = compare(results, level, lambda x: x.tokens_per_s,
                                               base=base, path=surface)
                print(f"{level:7d} {surface:>10} {shown:>18} {b:7.1f} {ours:8.1f} "
                      f"{ratio:6.3f} {'>= 0.95':>7} "
                      f"{v.check(ratio >= 0.95, f'{surface} vs {shown} at {level}')}"
                      f"  (best {best:.3f})")
        names = tuple(sorted({n for n, lvl in results if lvl == level}))
        print(f"{'':8}rounds: {rounds_line(results, level, lambda b: b.tokens_per_s, 1, names)}")
    print("every stream complete, and tokens a request (equal work on every path):")
    for name in sorted({n for n, _ in results}):
        streams = [s for (n, _), bursts in results.items() if n == name
                   for b in bursts for s in b.streams]
        complete = all(s.complete for s in streams)
        ttft = statistics.median(s.ttft for b in results[(name, 4)] for s in b.streams)
        print(f"{name:>18}: complete {complete}, tokens {sorted({s.tokens for s in streams})}, "
              f"median time to first token at 4 clients {ttft * 1000:.1f} ms  "
              f"{v.check(complete, f'{name} streams complete')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="streaming rounds per level and path")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens a streamed request")
    ap.add_argument("--latency-requests", type=int, default=300,
                    help="one-token requests per path for the latency")
    a = ap.parse_args()
    v = Verdicts()
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with (stack(tmp / "home", "llama-server") as st,
              direct_llama_server(tmp / "home", tmp) as (direct, argv)):
            gw = Target("sovctl", st["gateway"], {})
            flags = " ".join(f"{f} {argv[argv.index(f) + 1]}" for f in ("--threads", "--parallel"))
            print(f"{CHAT_MODEL.name}, {Path(argv[0]).name} {flags}, {a.max_tokens} tokens a "
                  f"stream, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            gateway = [Route(s, s, gw) for s in ENDPOINTS]
            directs = [Route(f"{s} direct", s, direct) for s in ENDPOINTS]
            unstored = Route("responses store:false", "responses", gw, (("store", False),))
            times = asyncio.run(latency(gateway + directs + [unstored], a.latency_requests))
            results = asyncio.run(stream_rounds(gateway + directs[1:], a.rounds, a.max_tokens))
    report_latency(times, a.latency_requests, v)
    report_streams(results, v)
    print("\n" + ("all targets met" if not v.missed else "MISSED: " + ", ".join(v.missed)))
    return 1 if v.missed else 0


if __name__ == "__main__":
    sys.exit(main())
