"""Gateway overhead, measured against the same runtime reached directly, in one run.

Targets (issue 3): streaming chat through the gateway reaches >= 0.95 of the tokens/s of the
same requests sent straight to the runtime; the gateway adds <= 2 ms to the median latency of
/v1/embeddings. Requests alternate between the two paths so machine noise hits both alike.

    .venv/bin/python benchmarks/bench_gateway.py [--rounds 20] [--embed-rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))


def sovctl(home: Path, *args: str) -> str:
    env = {**os.environ, "SOVCTL_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "sovctl", *args], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout


def stream_tokens_per_s(client: httpx.Client, base: str, model: str, max_tokens: int) -> float:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Tell me about the history of bread."}]}
    tokens = 0
    t0 = time.perf_counter()
    with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    tokens += 1
    return tokens / (time.perf_counter() - t0)


def embed_latency(client: httpx.Client, base: str, model: str) -> float:
    t0 = time.perf_counter()
    r = client.post(base + "/v1/embeddings", json={"model": model, "input": "A cat sits"})
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--embed-rounds", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        sovctl(home, "pull", str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"), "--name", "smol")
        sovctl(home, "pull", str(MODELS / "all-MiniLM-L6-v2-f16.gguf"), "--name", "minilm")
        from sovctl.runtime.plan import free_port

        port = free_port()
        sovctl(home, "serve", "--chat", "smol", "--embedding", "minilm", "--port", str(port),
               "-d")
        try:
            st = json.loads(sovctl(home, "--json", "status"))["data"]
            ports = {p["name"]: p["port"] for p in st["processes"]}
            gw = f"http://127.0.0.1:{port}"
            chat_direct = f"http://127.0.0.1:{ports['smol']}"
            emb_direct = f"http://127.0.0.1:{ports['minilm']}"
            with httpx.Client(timeout=300) as c:
                stream_tokens_per_s(c, gw, "smol", 8)  # warm-up both paths
                stream_tokens_per_s(c, chat_direct, "smol", 8)
                via, direct = [], []
                for i in range(args.rounds):
                    pair = [(via, gw), (direct, chat_direct)]
                    for sink, base in pair if i % 2 == 0 else reversed(pair):
                        sink.append(stream_tokens_per_s(c, base, "smol", args.max_tokens))
                for _ in range(20):
                    embed_latency(c, gw, "minilm")
                    embed_latency(c, emb_direct, "minilm")
                e_via, e_direct = [], []
                for i in range(args.embed_rounds):
                    pair = [(e_via, gw), (e_direct, emb_direct)]
                    for sink, base in pair if i % 2 == 0 else reversed(pair):
                        sink.append(embed_latency(c, base, "minilm"))
        finally:
            sovctl(home, "stop")
    tv, td = statistics.median(via), statistics.median(direct)
    ev, ed = statistics.median(e_via), statistics.median(e_direct)
    print(f"streaming chat tokens/s (median of {args.rounds}): gateway {tv:.1f}, "
          f"direct {td:.1f}, ratio {tv / td:.3f} (target >= 0.95)")
    print(f"embeddings median latency ({args.embed_rounds} each): gateway {ev * 1000:.2f} ms, "
          f"direct {ed * 1000:.2f} ms, added {(ev - ed) * 1000:.2f} ms (target <= 2 ms)")


if __name__ == "__main__":
    main()
