"""Models loaded on demand (issue 21), against llama-server, measured in one run.

Targets, on the same llama-server binary, model files and per-model flags (the argv sovctl's
plan gives its runtimes: --ctx-size, --parallel, --threads, --jinja ...):
  - cold start to first token: a streaming chat request to an on-demand model that is not
    loaded, through a running stack (the load included), <= 1.2x llama-server started by hand
    (from Popen, polling /health) plus its first streaming request; medians of rounds that
    alternate which goes first;
  - alternating A/B/A/B (SmolLM2 and stories260K) where only one fits the memory budget:
    requests per minute >= 0.9x llama-server's router mode (--models-dir, --models-max 1),
    with no failed request;
  - with both fitting, no added latency: the median short request to an on-demand model,
    loaded, within 1 ms of the same model loaded always (the same file under two names in one
    stack), requests interleaved.
Where the time goes in sovctl's cold start and in its switches is printed too, from the
supervisor's events in state.json (wall-clock times) and llama-server's own log. Every stack
runs from a temporary SOVCTL_HOME and is stopped at the end; the script checks that no process
it started is left. Exits 1 when a target is missed.

    .venv/bin/python benchmarks/bench_on_demand.py [--cold-rounds 6] [--ab-requests 40]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _common import sovctl as run_sovctl  # benchmarks/ is on the path of a script run from it
from _common import sovctl_command
from bench_runtime import Verdicts

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SOVCTL_TEST_MODELS", ROOT.parent / "shared" / "models"))
CHAT_MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = MODELS / "stories260K.gguf"
# Per the plan's sizing with 4 slots of 2048 tokens: smol 416 MiB, tiny 136 MiB. Only one of
# them fits under 500 MiB; both, twice over, under 2 GiB.
ONE_FITS = "500MiB"
ALL_FIT = "2GiB"
ENV = {"SOVCTL_SERVE__RUNTIME": "llama-server"}
CHAT_BODY = {"stream": True, "temperature": 0, "max_tokens": 8,
             "messages": [{"role": "user", "content": "Say hello to the lighthouse keeper."}]}
# llama-server's log lines start with its own clock: minutes.seconds.milliseconds.microseconds.
STAMP = rb"^(\d+)\.(\d+)\.(\d+)\.(\d+) I "
LISTENING = re.compile(STAMP + rb"srv +llama_server: listening on", re.MULTILINE)
FIRST_TASK = re.compile(STAMP + rb"slot launch_slot_", re.MULTILINE)


# Every sovctl call of this script with its settings.
sovctl = functools.partial(run_sovctl, env=ENV)


def free_port() -> int:
    from sovctl.runtime.ports import free_port as free

    return free()


@dataclass
class Stack:
    """A running `sovctl serve` stack, as its operator and its state file see it."""

    home: Path
    base: str
    seen: float = field(default_factory=time.time)  # events up to this time are read already

    def state(self) -> dict[str, Any]:
        return json.loads((self.home / "run" / "state.json").read_text())

    def proc(self, name: str) -> dict[str, Any]:
        return next(p for p in self.state()["processes"] if p["name"] == name)

    def new_events(self) -> list[tuple[float, str, str]]:
        """The supervisor's events since the last call: (wall time, process, what)."""
        found = [(e["time"], e["process"], e["event"]) for e in self.state()["events"]
                 if e["time"] > self.seen]
        if found:
            self.seen = found[-1][0]
        return found

    def plan_argv(self, name: str) -> list[str]:
        """The runtime's own argv, as sovctl's plan starts it (after its launch wrapper)."""
        plan = json.loads((self.home / "run" / "plan.json").read_text())
        args = list(next(p for p in plan["processes"] if p["name"] == name)["argv"]["args"])
        return args[args.index("--exec") + 1:]


@contextmanager
def stack(home: Path, toml: str, pulls: tuple[tuple[Path, str], ...]) -> Iterator[Stack]:
    for path, name in pulls:
        sovctl(home, "pull", str(path), "--name", name)
    (home / "sovctl.toml").write_text(toml)
    port = free_port()
    started = json.loads(sovctl(home, "--json", "serve", "--port", str(port), "-d"))
    try:
        yield Stack(home, f"http://127.0.0.1:{port}")
    finally:
        try:
            sovctl(home, "stop")
        except SystemExit:
            # The stop failed (a sovctl changed under a running stack): its supervisor stops
            # its children on SIGTERM, so none outlives the benchmark; the failure still counts.
            pid = started["data"]["supervisor_pid"]
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            raise


@contextmanager
def server(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """llama-server started by hand, in a session of its own (as sovctl starts its runtimes);
    its whole process group (a router's model instances too) ended on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what it left of its group, if anything
            proc.wait()


def runtime_flags(argv: list[str], *, drop: tuple[str, ...]) -> list[str]:
    """argv[1:] without the flags named (each with its value)."""
    out, args = [], argv[1:]
    i = 0
    while i < len(args):
        if args[i] in drop:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def first_token(client: httpx.Client, url: str, body: dict[str, Any],
                headers: dict[str, str]) -> float:
    """Stream a chat request; perf_counter() at its first content token (read to the end)."""
    at = 0.0
    with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not at and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    at = time.perf_counter()
    if not at:
        raise SystemExit(f"{url}: the stream carried no token")
    return at


def wait_healthy(url: str, proc: subprocess.Popen[bytes], poll: float) -> None:
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=2, trust_env=False) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {proc.returncode} before it was up")
            with suppress(httpx.TransportError):
                if c.get(url + "/health").status_code == 200:
                    return
            time.sleep(poll)
    raise SystemExit("llama-server did not come up")


def wait_unloaded(st: Stack, name: str) -> None:
    """Until the supervisor has unloaded `name` (idle_unload), as `sovctl status` says."""
    deadline = time.monotonic() + 60
    while st.proc(name)["load_state"] != "unloaded":  # the state file: cheap to poll
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} was not unloaded within 60 s")
        time.sleep(0.2)
    status = json.loads(sovctl(st.home, "--json", "status"))["data"]
    shown = next(p for p in status["processes"] if p["name"] == name)
    if shown["load_state"] != "unloaded":
        raise SystemExit(f"sovctl status shows {name} {shown['load_state']}, not unloaded")


def _seconds(m: re.Match[bytes]) -> float:
    mins, s, ms, us = (int(x) for x in m.groups())
    return mins * 60 + s + ms / 1e3 + us / 1e6


def runtime_clock(log: Path) -> tuple[float, float]:
    """By llama-server's own clock, at its last start: seconds from its start to listening,
    and from listening to the first request reaching a slot."""
    text = log.read_bytes()
    listening = list(LISTENING.finditer(text))
    if not listening:
        return float("nan"), float("nan")
    task = FIRST_TASK.search(text, listening[-1].end())
    up = _seconds(listening[-1])
    return up, (_seconds(task) - up) if task else float("nan")


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


# -- 1. cold start to first token ----------------------------------------------------------------
def cold_start(tmp: Path, rounds: int, poll: float, v: Verdicts) -> None:
    toml = '[models.smol]\nrole = "chat"\nload = "on-demand"\nidle_unload = "1s"\n'
    ours: list[float] = []
    theirs: list[float] = []
    parts: dict[str, list[float]] = {}
    with stack(tmp / "cold", toml, ((CHAT_MODEL, "smol"),)) as st, \
            httpx.Client(timeout=120, trust_env=False) as client:
        argv = st.plan_argv("smol")
        key = (st.home / "run" / "keys" / "smol.key").read_text().strip()
        body = {**CHAT_BODY, "model": "smol"}

        def by_sovctl() -> None:
            st.new_events()
            wall, t0 = time.time(), time.perf_counter()
            at = first_token(client, st.base, body, {})
            ours.append(at - t0)
            done = wall + (at - t0)
            ev = {what.split(":")[0].split(" pid")[0]: t for t, _, what in st.new_events()}
            up, reached = runtime_clock(st.home / "logs" / "smol.log")
            # The request reaching the supervisor; the spawn; llama-server's own start to
            # listening; from there to the supervisor's healthy probe (with the launch wrapper);
            # from listening to the request reaching it (the probe, then the gateway noticing);
            # from healthy to the first token at the client.
            for k, x in (("request -> load begins", ev["loading"] - wall),
                         ("load begins -> spawned", ev["started"] - ev["loading"]),
                         ("llama-server start -> listening (its clock)", up),
                         ("spawned -> healthy, less the above (launch, probe)",
                          ev["healthy"] - ev["started"] - up),
                         ("listening -> request reaches it (its clock)", reached),
                         ("healthy -> first token", done - ev["healthy"])):
                parts.setdefault(k, []).append(x)
            wait_unloaded(st, "smol")

        def by_hand() -> None:
            port = free_port()
            run = [argv[0], *runtime_flags(argv, drop=("--port", "--api-key-file")),
                   "--port", str(port), "--api-key-file", str(st.home / "run" / "keys" /
                                                              "smol.key")]
            url = f"http://127.0.0.1:{port}"
            log = tmp / "direct.log"
            t0 = time.perf_counter()
            with server(run, log) as proc:
                wait_healthy(url, proc, poll)
                healthy = time.perf_counter()
                at = first_token(client, url, body, {"authorization": f"Bearer {key}"})
                theirs.append(at - t0)
                up, reached = runtime_clock(log)
                parts.setdefault("by hand: llama-server start -> listening (its clock)",
                                 []).append(up)
                parts.setdefault("by hand: listening -> request reaches it (its clock)",
                                 []).append(reached)
                parts.setdefault("by hand: healthy -> first token", []).append(at - healthy)

        wait_unloaded(st, "smol")
        for r in range(rounds):
            for f in (by_sovctl, by_hand) if r % 2 == 0 else (by_hand, by_sovctl):
                f()
                time.sleep(0.5)
        loads = st.proc("smol")["loads"]
    a, b = statistics.median(theirs), statistics.median(ours)
    print(f"\n1. cold start to first token, median of {rounds} rounds (alternating first), "
          f"streaming chat, {CHAT_MODEL.name}")
    print(f"   llama-server by hand (Popen, /health every {poll:g} s, request): {ms(a)}  "
          f"{[round(x * 1000) for x in theirs]}")
    print(f"   sovctl, model unloaded, stack up ({loads} loads):{'':14}{ms(b)}  "
          f"{[round(x * 1000) for x in ours]}")
    print(f"   ratio {b / a:.3f} (<= 1.2) {v.check(b / a <= 1.2, 'cold start to first token')}")
    print("   where the time goes, medians:")
    for k, xs in parts.items():
        print(f"     {k:<52} {ms(statistics.median(xs)):>8}")


# -- 2. alternating A/B where only one fits --------------------------------------------------------
@dataclass
class Tally:
    seconds: list[float] = field(default_factory=list)
    by_model: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def per_minute(self) -> float:
        return 60 * len(self.seconds) / sum(self.seconds)


def complete(client: httpx.Client, url: str, model: str, tally: Tally) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/completions", json=body)
        bad = "" if r.status_code == 200 else f"{model}: {r.status_code} {r.text[:200]}"
    except httpx.HTTPError as e:
        bad = f"{model}: {type(e).__name__} {e}"
    took = time.perf_counter() - t0
    tally.seconds.append(took)
    tally.by_model.setdefault(model, []).append(took)
    if bad:
        tally.failed.append(bad)


def alternating(tmp: Path, requests: int, blocks: int, v: Verdicts) -> None:
    toml = (f'[serve]\nmemory_limit = "{ONE_FITS}"\n\n'
            '[models.smol]\nrole = "chat"\nload = "on-demand"\n\n'
            '[models.tiny]\nrole = "completion"\nload = "on-demand"\n')
    ours, theirs = Tally(), Tally()
    steps: dict[str, list[float]] = {}
    per_block = max(2, requests // blocks // 2 * 2)  # even: each block starts on smol
    with stack(tmp / "ab", toml, ((CHAT_MODEL, "smol"), (TINY_MODEL, "tiny"))) as st:
        smol, tiny = st.plan_argv("smol"), st.plan_argv("tiny")
        models = tmp / "models"
        models.mkdir()
        # The same files as the stack's (its store's blobs), named as the router names them.
        for name, argv in (("smol", smol), ("tiny", tiny)):
            (models / f"{name}.gguf").symlink_to(argv[argv.index("--model") + 1])
        port = free_port()
        flags = runtime_flags(smol, drop=("--model", "--alias", "--port", "--api-key-file"))
        router = [smol[0], "--models-dir", str(models), "--models-max", "1", *flags,
                  "--port", str(port)]
        # A new connection for every request, on both paths: the router drops a kept-alive
        # connection now and then around a switch, which a client reusing it sees as a failure.
        fresh = httpx.Limits(max_keepalive_connections=0)
        with server(router, tmp / "router.log") as proc, \
                httpx.Client(timeout=120, limits=fresh, trust_env=False) as ours_c, \
                httpx.Client(timeout=120, limits=fresh, trust_env=False) as theirs_c:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, 0.05)
            st.new_events()
            for b in range(blocks):
                paths = [(st.base, ours_c, ours), (url, theirs_c, theirs)]
                for base, c, tally in paths if b % 2 == 0 else reversed(paths):
                    for i in range(per_block):
                        model = ("smol", "tiny")[i % 2]
                        wall = time.time()
                        complete(c, base, model, tally)
                        if tally is ours:
                            ev = {(p, w.split(":")[0].split(" pid")[0].split(" to ")[0]): t
                                  for t, p, w in st.new_events()}
                            other = "tiny" if model == "smol" else "smol"
                            ends = wall + tally.seconds[-1]
                            if (model, "healthy") in ev and (other, "evicted") in ev:
                                t = {k: ev[(model, k)] for k in ("loading", "started",
                                                                  "healthy")}
                                for k, x in (("request -> eviction begins",
                                              ev[(other, "evicted")] - wall),
                                             ("eviction (stop of the other)",
                                              t["loading"] - ev[(other, "evicted")]),
                                             ("load begins -> healthy",
                                              t["healthy"] - t["loading"]),
                                             ("healthy -> answer", ends - t["healthy"])):
                                    steps.setdefault(f"to {model}: {k}", []).append(x)
                    time.sleep(0.5)
        procs = {p["name"]: p for p in st.state()["processes"]}
    n = len(ours.seconds)
    ratio = ours.per_minute / theirs.per_minute
    print(f"\n2. alternating smol/tiny, /v1/completions max_tokens 4, {n} requests a path in "
          f"{blocks} blocks (alternating first), sequential")
    print(f"   llama-server router (--models-max 1): {theirs.per_minute:6.1f} requests/min, "
          f"failed {len(theirs.failed)}")
    print(f"   sovctl (memory_limit {ONE_FITS}):{'':9}{ours.per_minute:6.1f} requests/min, "
          f"failed {len(ours.failed)}; loads smol {procs['smol']['loads']} tiny "
          f"{procs['tiny']['loads']}, evictions smol {procs['smol']['evictions']} tiny "
          f"{procs['tiny']['evictions']}")
    print(f"   ratio {ratio:.3f} (>= 0.9) {v.check(ratio >= 0.9, 'A/B requests per minute')}; "
          f"no failed request {v.check(not ours.failed, 'A/B without a failed request')}")
    for f in (ours.failed + theirs.failed)[:5]:
        print(f"     failed: {f}")
    print("   median request, by the model it switched to: " + "; ".join(
        f"{m} sovctl {ms(statistics.median(ours.by_model[m]))} router "
        f"{ms(statistics.median(theirs.by_model[m]))}" for m in ("smol", "tiny")))
    print("   sovctl's switches, medians from the supervisor's events:")
    for k, xs in sorted(steps.items()):
        print(f"     {k:<46} {ms(statistics.median(xs)):>8}  ({len(xs)} switches)")


# -- 3. both fit: on-demand against always ---------------------------------------------------------
def no_added_latency(tmp: Path, requests: int, v: Verdicts) -> None:
    toml = (f'[serve]\nmemory_limit = "{ALL_FIT}"\n\n'
            '[models.smol]\nrole = "chat"\n\n'
            '[models.smol2]\nrole = "chat"\nload = "on-demand"\n')
    times: dict[str, list[float]] = {"smol": [], "smol2": []}
    with stack(tmp / "both", toml, ((CHAT_MODEL, "smol"), (CHAT_MODEL, "smol2"))) as st, \
            httpx.Client(timeout=120, trust_env=False) as client:
        warm = 20
        for i in range(requests + warm):
            for model in ("smol", "smol2") if i % 2 == 0 else ("smol2", "smol"):
                body = {"model": model, "prompt": "Once upon a time", "max_tokens": 1,
                        "temperature": 0}
                t0 = time.perf_counter()
                r = client.post(st.base + "/v1/completions", json=body)
                took = time.perf_counter() - t0
                if r.status_code != 200:
                    raise SystemExit(f"{model}: {r.status_code} {r.text[:300]}")
                if i >= warm:  # the first ones load smol2 and open the connection
                    times[model].append(took)
        held = {p["name"]: p["load_state"] for p in st.state()["processes"]
                if p["kind"] == "runtime"}
        # What the gateway does for an on-demand request that the always path does not: a
        # fresh read of the state file when it is the only one in flight, the use file's lock.
        from sovctl.runtime.demand import Usage
        from sovctl.runtime.documents import StackState

        t0 = time.perf_counter()
        for _ in range(100):
            StackState.read(st.home / "run" / "state.json")
        read = (time.perf_counter() - t0) / 100
        usage = Usage(st.home / "run", "smol2")
        t0 = time.perf_counter()
        for _ in range(100):
            usage.enter()
            usage.leave()
        lock = (time.perf_counter() - t0) / 100
    always, lazy = (statistics.median(times[m]) for m in ("smol", "smol2"))
    paired = statistics.median(b - a for a, b in zip(times["smol"], times["smol2"],
                                                     strict=True))
    added = lazy - always
    print(f"\n3. both fit: median of {requests} non-streamed requests (max_tokens 1), "
          f"interleaved, kept-alive; states at the end {held}")
    print(f"   smol loaded always {always * 1000:.2f} ms, smol2 on demand (loaded) "
          f"{lazy * 1000:.2f} ms: added {added * 1000:+.2f} ms (<= 1) "
          f"{v.check(added <= 0.001, 'latency added by on-demand')}  (median of paired "
          f"differences {paired * 1000:+.2f} ms)")
    print(f"   for the record, outside the gateway: a read of state.json {read * 1000:.2f} ms, "
          f"the use file's lock taken and let go {lock * 1000:.3f} ms")


def leftovers(tmp: Path) -> list[str]:
    """Processes whose command line names the benchmark's temporary folder."""
    mark = str(tmp).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with suppress(OSError):
            cmd = (d / "cmdline").read_bytes()
            if mark in cmd:
                found.append(d.name + ": " + cmd.replace(b"\0", b" ")[:120].decode())
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cold-rounds", type=int, default=6, help="rounds per path, part 1")
    ap.add_argument("--poll", type=float, default=0.05,
                    help="seconds between the by-hand start's /health polls")
    ap.add_argument("--ab-requests", type=int, default=40, help="requests per path, part 2")
    ap.add_argument("--ab-blocks", type=int, default=4,
                    help="blocks the A/B requests come in, alternating which path goes first")
    ap.add_argument("--latency-requests", type=int, default=200,
                    help="requests per model, part 3")
    a = ap.parse_args()
    v = Verdicts()
    with tempfile.TemporaryDirectory(prefix="sovctl-bench-od-") as name:
        tmp = Path(name)
        print(f"{Path(sovctl_command()[0]).name}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; models from {MODELS}")
        t0 = time.monotonic()
        cold_start(tmp, a.cold_rounds, a.poll, v)
        alternating(tmp, a.ab_requests, a.ab_blocks, v)
        no_added_latency(tmp, a.latency_requests, v)
        left = leftovers(tmp)
        print(f"\nprocesses left: {len(left)} {v.check(not left, 'no process left')}"
              f"{''.join(chr(10) + '  ' + x for x in left)}; {time.monotonic() - t0:.0f} s")
    print("\n" + ("all targets met" if not v.missed else "MISSED: " + ", ".join(v.missed)))
    return 1 if v.missed else 0


if __name__ == "__main__":
    sys.exit(main())
