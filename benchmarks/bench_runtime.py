"""sovctl's serving stack against llama-server run directly, measured in one run.

Targets (issue 9), on the same binary, model, threads and slots:
  - streaming chat, 1 client: >= 0.95x llama-server's tokens/s;
  - 4 and 8 concurrent streaming clients: >= 0.9x llama-server's total tokens/s, every request
    complete, none starved (the slowest end-to-end time within 2x the median);
  - time to first token at 4 clients <= 1.1x llama-server's;
  - the gateway adds <= 2 ms to the median embedding request (kept-alive connections, against
    the embedding runtime called directly).
For the record: embeddings/s at 1 and 8 clients on llama-server --embeddings and on
llama-cpp-python, and the llama-cpp-python chat runtime through the gateway.

llama-server runs with the argv sovctl's own plan gives the chat runtime (only the port and key
file differ). The chat rounds alternate which path goes first, so machine noise hits both
alike; each figure is the median over the rounds. Exits 1 when a target is missed.

    .venv/bin/python benchmarks/bench_runtime.py [--rounds 3] [--max-tokens 64]
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))
CHAT_MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_MODEL = MODELS / "all-MiniLM-L6-v2-f16.gguf"
LEVELS = (1, 4, 8)
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
    streams: list[Stream]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams) / self.seconds

    @property
    def starvation(self) -> float:
        """The slowest request's end-to-end time over the median's."""
        times = [s.seconds for s in self.streams]
        return max(times) / statistics.median(times)


def sovctl(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "SOVCTL_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sovctl", *args], env=full, check=True,
                          capture_output=True, text=True).stdout


@contextmanager
def stack(home: Path, runtime: str) -> Iterator[dict[str, Any]]:
    """A running `sovctl serve` stack; yields its status document."""
    from sovctl.runtime.plan import free_port

    port = free_port()
    env = {"SOVCTL_SERVE__RUNTIME": runtime}
    sovctl(home, "serve", "--chat", "smol", "--embedding", "minilm", "--port", str(port), "-d",
           env=env)
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
    from sovctl.runtime.plan import free_port

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
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        yield Target("llama-server", base, {"authorization": f"Bearer {key}"}), argv
    finally:
        proc.terminate()
        proc.wait(30)


# -- streaming chat ------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, path: Target, i: int,
                     max_tokens: int) -> Stream:
    body = {"model": "smol", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            # Equal work on every request: llama-server's flag, llama-cpp-python's field.
            "ignore_eos": True, "min_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    tokens, ttft, finish, done = 0, 0.0, None, False
    t0 = time.perf_counter()
    async with client.stream("POST", path.base + "/v1/chat/completions", json=body,
                             headers=path.headers) as r:
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
    seconds = time.perf_counter() - t0
    return Stream(tokens, ttft, seconds, ok and done and finish is not None)


async def burst(client: httpx.AsyncClient, path: Target, clients: int, max_tokens: int) -> Burst:
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(stream_one(client, path, i, max_tokens)
                                     for i in range(clients)))
    return Burst(list(streams), time.perf_counter() - t0)


async def chat_rounds(paths: list[Target], rounds: int, max_tokens: int
                      ) -> dict[tuple[str, int], list[Burst]]:
    out: dict[tuple[str, int], list[Burst]] = {}
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        for path in paths:  # warm-up: fills each server's prompt cache the same way
            await burst(client, path, max(LEVELS), 4)
        for clients in LEVELS:
            for r in range(rounds):
                for path in paths if r % 2 == 0 else reversed(paths):
                    b = await burst(client, path, clients, max_tokens)
                    out.setdefault((path.name, clients), []).append(b)
    return out


# -- embeddings ----------------------------------------------------------------------------------
def embed_latency(paths: list[Target], n: int) -> dict[str, list[float]]:
    """Alternating single requests over one kept-alive connection per path."""
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    body = {"model": "minilm", "input": EMBED_TEXT}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for i in range(n + 20):
            for p in paths if i % 2 == 0 else reversed(paths):
                t0 = time.perf_counter()
                client.post(p.base + "/v1/embeddings", json=body,
                            headers=p.headers).raise_for_status()
                if i >= 20:  # the first ones open connections and warm caches
                    times[p.name].append(time.perf_counter() - t0)
    return times


async def embeds_per_s(path: Target, clients: int, seconds: float) -> float:
    body = {"model": "minilm", "input": EMBED_TEXT}
    done = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        async def worker(until: float) -> None:
            nonlocal done
            while time.perf_counter() < until:
                r = await client.post(path.base + "/v1/embeddings", json=body,
                                      headers=path.headers)
                r.raise_for_status()
                done += 1

        await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(clients)))
        done = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(clients)))
        return done / (time.perf_counter() - t0)


# -- reporting -----------------------------------------------------------------------------------
class Verdicts:
    def __init__(self) -> None:
        self.missed: list[str] = []

    def check(self, ok: bool, what: str) -> str:
        if not ok:
            self.missed.append(what)
        return "PASS" if ok else "MISS"


def report_chat(results: dict[tuple[str, int], list[Burst]], v: Verdicts) -> None:
    def med(name: str, clients: int, attr: str) -> float:
        return statistics.median(getattr(b, attr) for b in results[(name, clients)])

    print(f"\nstreaming chat, total tokens/s (median of {len(results[('sovctl', 1)])} rounds)")
    print(f"{'clients':>7} {'llama-server':>13} {'sovctl':>8} {'ratio':>6} {'target':>7}  "
          f"{'slowest/median e2e (direct, sovctl)':>36}  all complete")
    for clients in LEVELS:
        direct, ours = (med(n, clients, "tokens_per_s") for n in ("llama-server", "sovctl"))
        target = 0.95 if clients == 1 else 0.9
        verdict = v.check(ours / direct >= target, f"tokens/s at {clients} clients")
        starve = [max(b.starvation for b in results[(n, clients)])
                  for n in ("llama-server", "sovctl")]
        complete = [all(s.complete for b in results[(n, clients)] for s in b.streams)
                    for n in ("llama-server", "sovctl")]
        tokens = sorted({s.tokens for b in results[("sovctl", clients)] for s in b.streams})
        line = (f"{clients:7d} {direct:13.1f} {ours:8.1f} {ours / direct:6.3f} {target:>7}  "
                f"{verdict}")
        if clients > 1:
            ok = starve[1] <= 2 and complete[1]
            line += (f"  {starve[0]:5.2f} {starve[1]:5.2f} (<= 2)"
                     f"{'':14}{complete[0]!s:>5} {complete[1]!s:>5}  "
                     f"{v.check(ok, f'complete, unstarved at {clients} clients')}")
        else:
            line += f"{'':38}{complete[0]!s:>5} {complete[1]!s:>5}"
            v.check(complete[1], "complete at 1 client")
        print(line + f"   tokens/request {tokens}")
    ttft = {n: statistics.median(s.ttft for b in results[(n, 4)] for s in b.streams)
            for n in ("llama-server", "sovctl")}
    ratio = ttft["sovctl"] / ttft["llama-server"]
    print(f"time to first token at 4 clients (median): llama-server {ttft['llama-server']:.3f} s,"
          f" sovctl {ttft['sovctl']:.3f} s, ratio {ratio:.3f} (target <= 1.1) "
          f"{v.check(ratio <= 1.1, 'TTFT at 4 clients')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="chat rounds per level and path")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--embed-requests", type=int, default=300,
                    help="embedding latency requests per path")
    ap.add_argument("--embed-seconds", type=float, default=3.0,
                    help="duration of each embeddings/s measurement")
    a = ap.parse_args()
    v = Verdicts()
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        sovctl(home, "pull", str(CHAT_MODEL), "--name", "smol")
        sovctl(home, "pull", str(EMBED_MODEL), "--name", "minilm")

        with stack(home, "llama-server") as st:
            gw = Target("sovctl", st["gateway"], {})
            with direct_llama_server(home, tmp) as (direct, argv):
                threads = argv[argv.index("--threads") + 1]
                slots = argv[argv.index("--parallel") + 1]
                load = os.getloadavg()[0]
                print(f"{CHAT_MODEL.name}, {Path(argv[0]).name} --threads {threads} "
                      f"--parallel {slots}, {a.max_tokens} tokens a request, "
                      f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
                chat = asyncio.run(chat_rounds([gw, direct], a.rounds, a.max_tokens))
            report_chat(chat, v)

            emb = next(p for p in st["processes"] if p["name"] == "minilm")
            key = (home / "run" / "keys" / "minilm.key").read_text().strip()
            emb_direct = Target("runtime", f"http://127.0.0.1:{emb['port']}",
                               {"authorization": f"Bearer {key}"})
            lat = embed_latency([gw, emb_direct], a.embed_requests)
            ours, theirs = (statistics.median(lat[n]) * 1000 for n in ("sovctl", "runtime"))
            print(f"\nembedding latency, median of {a.embed_requests} (kept-alive, alternating): "
                  f"runtime {theirs:.2f} ms, through the gateway {ours:.2f} ms, added "
                  f"{ours - theirs:.2f} ms (target <= 2) "
                  f"{v.check(ours - theirs <= 2, 'embedding latency added')}")
            eps = {("llama-server", c): asyncio.run(embeds_per_s(gw, c, a.embed_seconds))
                   for c in (1, 8)}

        with stack(home, "llama-cpp-python") as st:
            gw = Target("sovctl", st["gateway"], {})
            for c in (1, 8):
                eps[("llama-cpp-python", c)] = asyncio.run(embeds_per_s(gw, c, a.embed_seconds))
            record = {c: asyncio.run(burst_once(gw, c, a.max_tokens)) for c in LEVELS}

    print("\nembeddings/s through the gateway (for the record: the faster runtime serves them)")
    for c in (1, 8):
        ls, lcp = eps[("llama-server", c)], eps[("llama-cpp-python", c)]
        print(f"  {c} client{'s' if c > 1 else ' '}: llama-server {ls:7.1f}, "
              f"llama-cpp-python {lcp:7.1f}  ({'llama-server' if ls >= lcp else 'llama-cpp-python'}"
              " faster)")
    print("\nllama-cpp-python chat runtime through the gateway (for the record, one round)")
    for c, b in record.items():
        print(f"  {c} client{'s' if c > 1 else ' '}: {b.tokens_per_s:6.1f} tokens/s, "
              f"slowest/median e2e {b.starvation:.2f}, "
              f"all complete {all(s.complete for s in b.streams)}")
    print("\n" + ("all targets met" if not v.missed else "MISSED: " + ", ".join(v.missed)))
    return 1 if v.missed else 0


async def burst_once(path: Target, clients: int, max_tokens: int) -> Burst:
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        await burst(client, path, 1, 4)
        return await burst(client, path, clients, max_tokens)


if __name__ == "__main__":
    sys.exit(main())
