"""sovctl's serving stack against llama-server run directly, measured in one run.

Targets (issue 9), on the same binary, model, threads and slots:
  - streaming chat, 1 client: >= 0.95x llama-server's tokens/s;
  - 4 and 8 concurrent streaming clients: >= 0.9x llama-server's total tokens/s, every request
    complete, none starved (the slowest end-to-end time within 2x the median);
  - time to first token at 4 clients <= 1.1x llama-server's;
  - the gateway adds <= 2 ms to the median embedding request (kept-alive connections, against
    the embedding runtime called directly).
For the record: embeddings/s at 1 and 8 clients through the gateway with the embedding model on
llama-server --embeddings and on llama-cpp-python, and the llama-cpp-python chat runtime.

llama-server runs with the argv sovctl's own plan gives the chat runtime (only the port and key
file differ). Runs of the two paths (and of the two embedding runtimes) alternate, each round
changing which goes first, and a throughput ratio is the median of the rounds' own ratios, so
machine noise hits both paths alike and one noisy round decides nothing. Time to first token
and embedding latency are medians over many requests. Exits 1 when a target is missed.

    .venv/bin/python benchmarks/bench_runtime.py [--rounds 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _common import sovctl  # benchmarks/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))
CHAT_MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_MODEL = MODELS / "all-MiniLM-L6-v2-f16.gguf"
LEVELS = (1, 4, 8)
EMBED_LEVELS = (1, 8)
# Distinct prompts per client, the same for both paths in every round: each server's prompt
# cache sees the same sequence of requests.
PROMPTS = [f"Write a long story about a lighthouse keeper and {thing}." for thing in (
    "a storm", "a cat", "a ship", "a letter", "a whale", "a lamp", "a map", "a bell")]
EMBED_TEXT = "A cat sits on the mat while the rain falls outside."


@dataclass(frozen=True)
class Target:
    """A server to send requests to: its base URL and the headers it wants."""

    name: str
    base: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Stream:
    tokens: int
    ttft: float
    seconds: float
    complete: bool


@dataclass(frozen=True)
class Burst:
    """Concurrent requests started together, one per client."""

    streams: list[Stream]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams) / self.seconds

    @property
    def ttft(self) -> float:
        return statistics.median(s.ttft for s in self.streams)

    @property
    def starvation(self) -> float:
        """The slowest request's end-to-end time over the median's."""
        times = [s.seconds for s in self.streams]
        return max(times) / statistics.median(times)


@contextmanager
def stack(home: Path, runtime: str) -> Iterator[dict[str, Any]]:
    """A running `sovctl serve` stack on its own home; yields its status document."""
    from sovctl.runtime.ports import free_port

    sovctl(home, "pull", str(CHAT_MODEL), "--name", "smol")
    sovctl(home, "pull", str(EMBED_MODEL), "--name", "minilm")
    port = free_port()
    sovctl(home, "serve", "--chat", "smol", "--embedding", "minilm", "--port", str(port), "-d",
           env={"SOVCTL_SERVE__RUNTIME": runtime})
    try:
        status = json.loads(sovctl(home, "--json", "status"))["data"]
        status["gateway"] = f"http://127.0.0.1:{port}"
        yield status
    finally:
        sovctl(home, "stop")


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode} before it was up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("llama-server did not come up")


@contextmanager
def direct_llama_server(home: Path, tmp: Path) -> Iterator[tuple[Target, list[str]]]:
    """llama-server started by hand with the chat runtime's argv from sovctl's plan."""
    from sovctl.runtime.ports import free_port

    plan = json.loads((home / "run" / "plan.json").read_text())
    spec = next(p for p in plan["processes"] if p["name"] == "smol")
    args = list(spec["argv"]["args"])
    argv = args[args.index("--exec") + 1:]
    key = secrets.token_urlsafe(32)
    key_file = tmp / "direct.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--api-key-file") + 1] = str(key_file)
    with open(tmp / "llama-server.log", "wb") as log:
        # In a session of its own, as sovctl starts its runtimes: with the kernel's autogroups
        # the session decides how the CPUs are shared with the clients.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        yield Target("llama-server", base, {"authorization": f"Bearer {key}"}), argv
    finally:
        proc.terminate()
        proc.wait(30)


# -- streaming chat ------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, target: Target, i: int,
                     max_tokens: int) -> Stream:
    body = {"model": "smol", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            # Equal work on every request: llama-server's flag, llama-cpp-python's field.
            "ignore_eos": True, "min_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    tokens, ttft, finish, done, ok = 0, 0.0, None, False, False
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", target.base + "/v1/chat/completions", json=body,
                                 headers=target.headers) as r:
            ok = r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    choices = event.get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        tokens += 1
                        if tokens == 1:
                            ttft = time.perf_counter() - t0
                    finish = choices[0].get("finish_reason") or finish
                    ok = ok and "error" not in event
    except httpx.TransportError:
        ok = False  # counted as incomplete
    seconds = time.perf_counter() - t0
    return Stream(tokens, ttft, seconds, ok and done and finish is not None)


def chat_client() -> httpx.AsyncClient:
    # A new connection for every request, on both paths. llama-server closes its connection
    # after a streamed answer (without saying so), so its clients have to reconnect; the same
    # client must then reconnect to the gateway too. One that reused its connections would
    # send a burst out faster, spread only by its own time per request, and llama-server would
    # start on the first request before the others arrive: a later first token for them, which
    # comes from the client's pattern, not from the gateway (about +5 ms here at 4 clients).
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=600, limits=limits, trust_env=False)


async def burst(client: httpx.AsyncClient, target: Target, clients: int,
                max_tokens: int) -> Burst:
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(stream_one(client, target, i, max_tokens)
                                     for i in range(clients)))
    return Burst(list(streams), time.perf_counter() - t0)


async def chat_rounds(targets: list[Target], levels: tuple[int, ...], rounds: int,
                      max_tokens: int) -> dict[tuple[str, int], list[Burst]]:
    out: dict[tuple[str, int], list[Burst]] = {}
    clients = {t.name: chat_client() for t in targets}
    try:
        for t in targets:  # warm-up: fills each server's prompt cache the same way
            await burst(clients[t.name], t, max(levels), 4)
        for level in levels:
            for r in range(rounds):
                for t in targets if r % 2 == 0 else reversed(targets):
                    b = await burst(clients[t.name], t, level, max_tokens)
                    out.setdefault((t.name, level), []).append(b)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


# -- embeddings ----------------------------------------------------------------------------------
def embed_latency(targets: list[Target], n: int) -> dict[str, list[float]]:
    """Alternating single requests, over one kept-alive connection per target."""
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    body = {"model": "minilm", "input": EMBED_TEXT}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for i in range(n + 20):
            for t in targets if i % 2 == 0 else reversed(targets):
                t0 = time.perf_counter()
                client.post(t.base + "/v1/embeddings", json=body,
                            headers=t.headers).raise_for_status()
                if i >= 20:  # the first ones open connections and warm caches
                    times[t.name].append(time.perf_counter() - t0)
    return times


async def embeds_per_s(client: httpx.AsyncClient, target: Target, clients: int,
                       seconds: float) -> float:
    body = {"model": "minilm", "input": EMBED_TEXT}
    done = 0

    async def worker(until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            r = await client.post(target.base + "/v1/embeddings", json=body,
                                  headers=target.headers)
            r.raise_for_status()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t0 + seconds) for _ in range(clients)))
    return done / (time.perf_counter() - t0)


async def embed_rounds(targets: list[Target], rounds: int, seconds: float
                       ) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        for t in targets:
            await embeds_per_s(client, t, max(EMBED_LEVELS), 0.5)  # warm-up, connections
        for level in EMBED_LEVELS:
            for r in range(rounds):
                for t in targets if r % 2 == 0 else reversed(targets):
                    out.setdefault((t.name, level), []).append(
                        await embeds_per_s(client, t, level, seconds))
    return out


# -- reporting -----------------------------------------------------------------------------------
class Verdicts:
    def __init__(self) -> None:
        self.missed: list[str] = []

    def check(self, ok: bool, what: str) -> str:
        if not ok:
            self.missed.append(what)
        return "PASS" if ok else "MISS"


def compare(results: dict[tuple[str, int], list[Burst]], level: int,
            figure: Callable[[Burst], float], base: str = "llama-server", path: str = "sovctl"
            ) -> tuple[float, float, float, float]:
    """(the base's median round, the path's median round, the median of the rounds' own
    ratios, the ratio of the two best rounds). A round's two runs follow each other, so its
    ratio sees the same machine; a noisy round moves the median of the ratios less than it
    moves any other figure."""
    direct = [figure(b) for b in results[(base, level)]]
    ours = [figure(b) for b in results[(path, level)]]
    paired = statistics.median(o / d for o, d in zip(ours, direct, strict=True))
    return statistics.median(direct), statistics.median(ours), paired, max(ours) / max(direct)


def rounds_line(results: dict[tuple[str, int], list[Burst]], level: int,
                figure: Callable[[Burst], float], digits: int,
                names: tuple[str, ...] = ("llama-server", "sovctl")) -> str:
    return "; ".join(f"{n} {[round(figure(b), digits) for b in results[(n, level)]]}"
                     for n in names)


def report_chat(results: dict[tuple[str, int], list[Burst]], v: Verdicts) -> None:
    rounds = len(results[("sovctl", 1)])
    print(f"\nstreaming chat, total tokens/s: medians of {rounds} rounds, and of the rounds' "
          "ratios (the best rounds' ratio beside)")
    print(f"{'clients':>7} {'llama-server':>12} {'sovctl':>7} {'ratio':>6} {'target':>7}")
    for level in LEVELS:
        direct, ours, ratio, best = compare(results, level, lambda b: b.tokens_per_s)
        target = 0.95 if level == 1 else 0.9
        print(f"{level:7d} {direct:12.1f} {ours:7.1f} {ratio:6.3f} {'>= ' + str(target):>7} "
              f"{v.check(ratio >= target, f'tokens/s at {level} clients')}  (best {best:.3f})")
        print(f"{'':8}rounds: {rounds_line(results, level, lambda b: b.tokens_per_s, 1)}")
    print("every request complete, none starved: slowest/median end-to-end in the worst round "
          "(and the median round)")
    for level in LEVELS[1:]:
        starve = {n: [b.starvation for b in results[(n, level)]]
                  for n in ("llama-server", "sovctl")}
        complete = {n: all(s.complete for b in results[(n, level)] for s in b.streams)
                    for n in ("llama-server", "sovctl")}
        tokens = sorted({s.tokens for b in results[("sovctl", level)] for s in b.streams})
        ok = complete["sovctl"] and max(starve["sovctl"]) <= 2
        print(f"{level:7d} clients: sovctl {max(starve['sovctl']):.2f} "
              f"({statistics.median(starve['sovctl']):.2f}) <= 2, complete {complete['sovctl']}, "
              f"tokens/request {tokens}; llama-server {max(starve['llama-server']):.2f} "
              f"({statistics.median(starve['llama-server']):.2f}), complete "
              f"{complete['llama-server']}  {v.check(ok, f'complete, none starved at {level}')}")
    v.check(all(s.complete for b in results[("sovctl", 1)] for s in b.streams),
            "complete at 1 client")


def report_ttft(results: dict[tuple[str, int], list[Burst]], v: Verdicts) -> None:
    """Time to first token is a few decode steps, so a round decides little: the figure is the
    median over every request of every round."""
    direct, ours = (statistics.median(s.ttft for b in results[(n, 4)] for s in b.streams)
                    for n in ("llama-server", "sovctl"))
    _, _, paired, _ = compare(results, 4, lambda b: b.ttft)
    rounds = len(results[("sovctl", 4)])
    print(f"time to first token at 4 clients, median of {rounds} rounds x 4 requests: "
          f"llama-server {direct * 1000:.1f} ms, sovctl {ours * 1000:.1f} ms, ratio "
          f"{ours / direct:.3f} (<= 1.1) {v.check(ours / direct <= 1.1, 'TTFT at 4 clients')}"
          f"  (median of the rounds' ratios {paired:.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8,
                    help="rounds per level and path (chat, embeddings/s)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ttft-rounds", type=int, default=30,
                    help="rounds per path of 4 clients asking for 4 tokens, for the TTFT")
    ap.add_argument("--embed-requests", type=int, default=300,
                    help="embedding latency requests per path")
    ap.add_argument("--embed-seconds", type=float, default=1.0,
                    help="duration of each embeddings/s run")
    a = ap.parse_args()
    v = Verdicts()
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-") as tmp_name, ExitStack() as stacks:
        tmp = Path(tmp_name)
        st = stacks.enter_context(stack(tmp / "home", "llama-server"))
        gw = Target("sovctl", st["gateway"], {})
        with direct_llama_server(tmp / "home", tmp) as (direct, argv):
            flags = " ".join(f"{f} {argv[argv.index(f) + 1]}" for f in ("--threads", "--parallel"))
            print(f"{CHAT_MODEL.name}, {Path(argv[0]).name} {flags}, {a.max_tokens} tokens a "
                  f"request, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            chat = asyncio.run(chat_rounds([gw, direct], LEVELS, a.rounds, a.max_tokens))
            # The first token comes before the rest: short answers give more rounds a minute.
            ttft = asyncio.run(chat_rounds([gw, direct], (4,), a.ttft_rounds, 4))
        report_chat(chat, v)
        report_ttft(ttft, v)

        emb = next(p for p in st["processes"] if p["name"] == "minilm")
        key = (tmp / "home" / "run" / "keys" / "minilm.key").read_text().strip()
        runtime = Target("runtime", f"http://127.0.0.1:{emb['port']}",
                         {"authorization": f"Bearer {key}"})
        lat = embed_latency([gw, runtime], a.embed_requests)
        ours, theirs = (statistics.median(lat[n]) * 1000 for n in ("sovctl", "runtime"))
        print(f"\nembedding latency, median of {a.embed_requests} (kept-alive, alternating): "
              f"runtime {theirs:.2f} ms, through the gateway {ours:.2f} ms, added "
              f"{ours - theirs:.2f} ms (<= 2) "
              f"{v.check(ours - theirs <= 2, 'embedding latency added')}")

        fallback = stacks.enter_context(stack(tmp / "home-lcp", "llama-cpp-python"))
        gw_lcp = Target("llama-cpp-python", fallback["gateway"], {})
        eps = asyncio.run(embed_rounds([Target("llama-server", gw.base, {}), gw_lcp],
                                       a.rounds, a.embed_seconds))
        print(f"\nembeddings/s through the gateway, by embedding runtime: medians of {a.rounds} "
              f"alternating runs of {a.embed_seconds:g} s (the best run beside)")
        for level in EMBED_LEVELS:
            ls, lcp = (eps[(n, level)] for n in ("llama-server", "llama-cpp-python"))
            faster = ("llama-server" if statistics.median(ls) >= statistics.median(lcp)
                      else "llama-cpp-python")
            print(f"{level:7d} client{'s' if level > 1 else ' '}: llama-server "
                  f"{statistics.median(ls):6.1f} ({max(ls):.1f}), llama-cpp-python "
                  f"{statistics.median(lcp):6.1f} ({max(lcp):.1f}): {faster} faster")
        record = asyncio.run(chat_rounds([gw_lcp], LEVELS, 1, a.max_tokens))
    print("\nfor the record: the llama-cpp-python chat runtime through the gateway (one round)")
    for level in LEVELS:
        (b,) = record[("llama-cpp-python", level)]
        print(f"{level:7d} client{'s' if level > 1 else ' '}: {b.tokens_per_s:6.1f} tokens/s, "
              f"time to first token {b.ttft:.3f} s, slowest/median end-to-end "
              f"{b.starvation:.2f}, complete {all(s.complete for s in b.streams)}")
    print("\n" + ("all targets met" if not v.missed else "MISSED: " + ", ".join(v.missed)))
    return 1 if v.missed else 0


if __name__ == "__main__":
    sys.exit(main())
