"""`sovctl upgrade --apply` and `sovctl rollback` under a concurrent stream of requests
(issue 22), measured in one run.

A stack serves "chat" (SmolLM2-135M, the pin) while client threads send completions, plain
and streamed, one after another, without pause. The candidate is the same checkpoint with one
byte of its name in the GGUF header changed: another file and sha256, the same work per token,
so what the figures show is the switch and nothing else. Windows of the same stream, one run:
  - apply: `sovctl upgrade chat --apply` (compared beforehand), the stream's requests that
    start from the moment it is run to 2 s after it returns;
  - rollback: `sovctl rollback chat`, likewise;
  - after each, a baseline: the same stream for as long, with no switch.
For each window: requests completed, requests failed (target: none), the median and the
longest request latency, and the longest gap between two successive completions (how long the
stream went with no answer at all). Printed with the ratio of each switch window's figures to
the baseline's. The switch window runs three runtimes on the machine for a moment (the old,
the new, the client load), so its latencies are higher on few cores: the target is no failed
request, and the figures say what a switch costs besides. Exits 1 when a request failed or a
process outlived the stack.

    .venv/bin/python benchmarks/bench_upgrade.py [--clients 4] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from _common import sovctl as run_sovctl  # benchmarks/ is on the path of a script run from it
from _common import sovctl_command

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))
CHAT_MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = {"SOVCTL_SERVE__RUNTIME": "llama-server", "SOVCTL_SERVE__HEALTH_INTERVAL": "0.5"}
SETTINGS = '[models.chat]\nrole = "chat"\nn_ctx = 512\nparallel = 2\nn_threads = 1\n'


# Every sovctl call of this script with its settings.
sovctl = functools.partial(run_sovctl, env=ENV)


def renamed(gguf: bytes) -> bytes:
    """The same model with the first letter of its general.name changed in the header."""
    data = bytearray(gguf)
    at = data.index(b"general.name") + len(b"general.name") + 4 + 8  # past type and length
    data[at] ^= 0x20  # its case
    return bytes(data)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class Stream:
    """Client threads sending completions back to back; each request's (start, end, ok)."""

    base: str
    max_tokens: int
    done: list[tuple[float, float, bool, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, n: int) -> None:
        with httpx.Client(base_url=self.base, timeout=300) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = {"model": "chat", "prompt": f"Once upon a time {n}.{i}",
                        "max_tokens": self.max_tokens, "temperature": 0}
                t0 = time.monotonic()
                try:
                    if (n + i) % 2:
                        with c.stream("POST", "/v1/completions",
                                      json={**body, "stream": True}) as r:
                            text = "".join(r.iter_text())
                        ok = r.status_code == 200 and "[DONE]" in text and '"error"' not in text
                        why = "" if ok else f"{r.status_code} {text[-200:]}"
                    else:
                        r = c.post("/v1/completions", json=body)
                        ok = r.status_code == 200
                        why = "" if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
                with self.lock:
                    self.done.append((t0, time.monotonic(), ok, why))


@dataclass(frozen=True)
class Window:
    name: str
    requests: int
    failed: int
    median: float
    longest: float
    gap: float  # the longest time with no request completing
    seconds: float
    reasons: tuple[str, ...]


def window(name: str, done: list[tuple[float, float, bool, str]], start: float,
           end: float) -> Window:
    """The requests that started in [start, end)."""
    inside = sorted((d for d in done if start <= d[0] < end), key=lambda d: d[1])
    latencies = [e - s for s, e, _, _ in inside]
    ends = [start] + [e for _, e, _, _ in inside]
    return Window(name, len(inside), sum(1 for d in inside if not d[2]),
                  statistics.median(latencies) if latencies else 0.0,
                  max(latencies, default=0.0),
                  max((b - a for a, b in itertools.pairwise(ends)), default=0.0),
                  end - start, tuple(d[3] for d in inside if not d[2])[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    from sovctl.runtime.ports import free_port

    with tempfile.TemporaryDirectory(prefix="sovctl-bench-upgrade-") as tmp:
        home = Path(tmp)
        sovctl(home, "pull", str(CHAT_MODEL), "--name", "chat")
        (home / "sovctl.toml").write_text(SETTINGS)
        candidate = home / "candidate.gguf"
        candidate.write_bytes(renamed(CHAT_MODEL.read_bytes()))
        t = time.monotonic()
        sovctl(home, "--json", "upgrade", "chat", str(candidate))
        compare_s = time.monotonic() - t
        port = free_port()
        sovctl(home, "serve", "--port", str(port), "-d")
        state = home / "run" / "state.json"
        pids = {json.loads(state.read_text())["supervisor_pid"]}
        s = Stream(f"http://127.0.0.1:{port}", args.max_tokens)
        threads = [threading.Thread(target=s.client, args=(n,), daemon=True)
                   for n in range(args.clients)]
        windows: list[Window] = []
        switched: dict[str, dict[str, object]] = {}
        try:
            for th in threads:
                th.start()
            time.sleep(3.0)  # the stream under way
            for name, command in (("apply", ("upgrade", "chat", "--apply")),
                                  ("rollback", ("rollback", "chat"))):
                pids |= {p["pid"] for p in json.loads(state.read_text())["processes"]
                         if p["pid"]}
                start = time.monotonic()
                switched[name] = json.loads(sovctl(home, "--json", *command))["data"]
                time.sleep(2.0)
                end = time.monotonic()
                windows.append(window(name, s.done, start, end))
                # The baseline: the same stream, no switch, as long.
                time.sleep(end - start)
                windows.append(window(f"baseline after {name}", s.done, end, 2 * end - start))
        finally:
            s.stop.set()
            for th in threads:
                th.join(timeout=300)
            pids |= {p["pid"] for p in json.loads(state.read_text())["processes"] if p["pid"]}
            subprocess.run([*sovctl_command(), "stop"], capture_output=True,
                           env={**os.environ, "SOVCTL_HOME": str(home), **ENV})
        left = [p for p in pids if pid_alive(p)]

    applied = switched["apply"]["applied"]
    assert isinstance(applied, dict)
    rolled = switched["rollback"]
    print(f"compare (both started, fixed requests, [eval], tokens/s): {compare_s:.1f}s")
    print(f"apply: {applied['seconds']}s live switch, old runtime drained in "
          f"{applied['drain_seconds']}s; rollback: {rolled['seconds']}s, drained in "
          f"{rolled['drain_seconds']}s ({args.clients} clients, {args.max_tokens} tokens each)")
    print(f"{'window':<24}{'requests':>9}{'failed':>8}{'median s':>10}{'longest s':>11}"
          f"{'gap s':>8}")
    for w in windows:
        print(f"{w.name:<24}{w.requests:>9}{w.failed:>8}{w.median:>10.3f}{w.longest:>11.3f}"
              f"{w.gap:>8.3f}")
        for why in w.reasons:
            print(f"    failed: {why}")
    for switch, base in ((windows[0], windows[1]), (windows[2], windows[3])):
        print(f"{switch.name}: longest request {switch.longest / base.longest:.2f}x the "
              f"baseline's, longest gap {switch.gap / base.gap:.2f}x, median "
              f"{switch.median / base.median:.2f}x (measured)")
    failed = sum(w.failed for w in windows)
    print(f"failed requests: {failed} (target 0); processes left: {len(left)} (target 0)")
    return 0 if failed == 0 and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
