"""The seven checks of the blackout audit. Each returns a CheckResult with its evidence in words
(and, where a list helps, in `details`). A check that could not run is a FAIL that says why:
nothing passes by default.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovctl.errors import ConfigError
from sovctl.home import Home
from sovctl.runtime import egress
from sovctl.runtime.documents import RoutesTable
from sovctl.runtime.plan import OFFLINE_ENV, Plan, ServedModel, routes_table

if TYPE_CHECKING:
    from sovctl.audit.baseline import Exchange

NAMES = {
    1: "isolation",
    2: "weights",
    3: "stack starts",
    4: "service",
    5: "behaviour",
    6: "no egress",
    7: "configuration",
}

# Public addresses a connect must fail to reach, and a name a lookup must fail to resolve.
PUBLIC_TARGETS = (("1.1.1.1", 443), ("8.8.8.8", 53), ("2606:4700:4700::1111", 443))
PUBLIC_NAME = "huggingface.co"
TELEMETRY_ENV = {k: OFFLINE_ENV[k] for k in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                                             "DO_NOT_TRACK")}


@dataclass(frozen=True)
class CheckResult:
    id: int
    name: str
    passed: bool
    evidence: str
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckResult:
        return cls(int(d["id"]), str(d["name"]), bool(d["passed"]), str(d["evidence"]),
                   float(d["seconds"]), dict(d.get("details") or {}))


def result(check_id: int, passed: bool, evidence: str, seconds: float,
           details: Mapping[str, Any] | None = None) -> CheckResult:
    return CheckResult(check_id, NAMES[check_id], passed, evidence, round(seconds, 3),
                       dict(details or {}))


def not_run(check_id: int, why: str) -> CheckResult:
    return result(check_id, False, f"not run: {why}", 0.0)


# -- 1. isolation ------------------------------------------------------------------------------

def _connect(host: str, port: int, timeout: float) -> str | None:
    """None when the connection succeeded, else why it failed."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def _lookup(name: str, timeout: float) -> tuple[str | None, list[str]]:
    """(why the lookup failed, or None; addresses found). Runs in a thread to bound its time."""
    import concurrent.futures as cf

    ex = cf.ThreadPoolExecutor(1)
    future = ex.submit(socket.getaddrinfo, name, 443, proto=socket.IPPROTO_TCP)
    try:
        infos = future.result(timeout=timeout)
    except cf.TimeoutError:
        return f"no answer within {timeout:.0f}s", []
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}", []
    finally:
        ex.shutdown(wait=False)
    return None, sorted({str(i[4][0]) for i in infos})


def isolation(mode: str, outer_netns: str, timeout: float = 3.0) -> CheckResult:
    t0 = time.perf_counter()
    from sovctl.audit.isolation import current_netns

    inner = current_netns()
    interfaces = sorted(name for _, name in socket.if_nameindex())
    problems = []
    parts = [f"{mode} {inner} (outside: {outer_netns}); interfaces: {', '.join(interfaces)}"]
    if inner == outer_netns:
        problems.append("the audit is in the host's network namespace")
    if interfaces != ["lo"]:
        problems.append(f"interfaces besides loopback: {', '.join(interfaces)}")
    details: dict[str, Any] = {"mode": mode, "netns": inner, "outer_netns": outer_netns,
                               "interfaces": interfaces, "connects": {}}
    for host, port in PUBLIC_TARGETS:
        why = _connect(host, port, timeout)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        details["connects"][target] = why or "connected"
        if why is None:
            problems.append(f"TCP connect to {target} succeeded")
        else:
            parts.append(f"connect {target} failed ({why})")
    why, addrs = _lookup(PUBLIC_NAME, timeout)
    details["lookup"] = {PUBLIC_NAME: why or addrs}
    if why is None:
        problems.append(f"DNS lookup of {PUBLIC_NAME} succeeded: {', '.join(addrs)}")
    else:
        parts.append(f"lookup {PUBLIC_NAME} failed ({why})")
    evidence = "; ".join(problems + parts) if problems else "; ".join(parts)
    return result(1, not problems, evidence, time.perf_counter() - t0, details)


# -- 2. weights --------------------------------------------------------------------------------

def weights(home: Home, models: Sequence[ServedModel]) -> CheckResult:
    """Every served blob re-hashed in full against sovctl.lock; no network involved."""
    from sovctl.store.integrity import check

    t0 = time.perf_counter()
    rows = []
    bad = []
    for m in models:
        r = check(home, m.name, m.sha256, m.size, full=True)
        rows.append({"model": m.name, "sha256": m.sha256, "status": r.status,
                     "method": r.method, "actual": r.actual})
        if r.ok:
            continue
        if r.status == "missing":
            bad.append(f"{m.name}: blob missing (lock sha256 {m.sha256[:12]}…)")
        else:
            found = f"{r.actual[:12]}…" if r.actual and len(r.actual) == 64 else r.actual
            bad.append(f"{m.name}: blob does not match the lock (lock sha256 "
                       f"{m.sha256[:12]}…, found {found})")
    if bad:
        evidence = "; ".join(bad)
    else:
        evidence = ", ".join(f"{m.name} sha256 {m.sha256[:12]}… ok" for m in models) \
            + " (full re-hash against sovctl.lock)"
    return result(2, not bad, evidence, time.perf_counter() - t0, {"models": rows})


# -- 3. the stack starts -----------------------------------------------------------------------

def stack_starts(base: str, headers: Mapping[str, str], started_in: float,
                 start_error: str | None) -> CheckResult:
    from sovctl.audit.stack import wait_ready

    if start_error is not None:
        return result(3, False, f"the stack did not start: {start_error}", started_in)
    ready = wait_ready(base, dict(headers))
    seconds = started_in + ready.seconds
    if not ready.ok:
        return result(3, False, f"/ready did not answer 200 within {ready.seconds:.0f}s of the "
                      f"start; last: {ready.last}", seconds)
    waited = f" (after {ready.seconds:.1f}s, {ready.polls} polls)" if ready.polls > 1 else ""
    return result(3, True, f"up in {started_in:.1f}s; GET /ready {ready.last}{waited}", seconds,
                  {"ready": ready.body, "polls": ready.polls})


# -- 4. service --------------------------------------------------------------------------------

def service(models: Sequence[ServedModel], exchange: Exchange) -> CheckResult:
    from sovctl.audit.baseline import REQUESTS

    parts = []
    problems = []
    for a in exchange.answers:
        if a.ok:
            vectors, text = a.vectors or [[]], a.text or ""
            if a.request == "embeddings":
                what = f"{len(vectors)}x{len(vectors[0])} vectors"
            elif a.request == "chat_stream":
                what = f"{a.events} events, {len(text)} chars"
            else:
                what = f"{len(text)} chars"
            parts.append(f"{a.model} {a.request} 200 ({what}, {a.seconds:.2f}s)")
        else:
            problems.append(f"{a.model} {a.request} failed: status {a.status} "
                            f"{a.error or 'empty answer'}")
    served = {m.name for m in models}
    if exchange.models_status != 200:
        problems.append(f"/v1/models answered {exchange.models_status} {exchange.models_error}")
    elif not served <= set(exchange.models_listed):
        lacking = ", ".join(sorted(served - set(exchange.models_listed)))
        problems.append(f"/v1/models lacks {lacking}")
    else:
        parts.append(f"/v1/models 200 ({', '.join(exchange.models_listed)})")
    roles = {m.role for m in models}
    missing = [kind for kind, have in (("chat", "chat" in roles),
                                       ("embeddings", "embedding" in roles),
                                       ("completions", bool(roles & {"chat", "completion"})))
               if not have]
    if missing:
        parts.append(f"not served by this stack, so not exercised: {', '.join(missing)}")
    expected = sum(len(REQUESTS.get(m.role, [])) for m in models)
    if len(exchange.answers) != expected:
        problems.append(f"{len(exchange.answers)} of {expected} requests were sent")
    evidence = "; ".join(problems + parts)
    return result(4, not problems, evidence, exchange.seconds,
                  {"answers": [{"model": a.model, "request": a.request, "status": a.status,
                                "seconds": round(a.seconds, 3), "error": a.error}
                               for a in exchange.answers]})


# -- 5. behaviour --------------------------------------------------------------------------------

def behaviour(home: Home, models: Sequence[ServedModel], exchange: Exchange,
              recorded_now: Sequence[str]) -> CheckResult:
    from sovctl.audit import baseline

    t0 = time.perf_counter()
    diffs: list[str] = []
    parts: list[str] = []
    used: dict[str, str] = {}
    for m in models:
        found = baseline.find(home, m)
        if found.status == "missing":
            diffs.append(f"{m.name}: no baseline recorded (run 'sovctl audit baseline')")
            continue
        used[m.name] = str(found.path)
        answers = exchange.for_model(m.name)
        d = baseline.compare(m, found, answers)
        diffs += d
        if not d:
            worst = baseline.max_embedding_diff(found, answers)
            same = ", ".join(a.request for a in answers if a.request != "embeddings")
            bits = [f"{same} identical"] if same else []
            if worst is not None:
                bits.append(f"embeddings max |Δ| {worst:.2g} ≤ {baseline.EMBEDDING_TOLERANCE:g}")
            when = found.doc.get("recorded_at") if found.doc else "?"
            parts.append(f"{m.name}: {'; '.join(bits)} (baseline of {when})")
    note = ""
    if recorded_now:
        note = (f"baseline recorded just now, with the network available, for "
                f"{', '.join(recorded_now)} (none existed)")
    evidence = "; ".join(diffs + parts + ([note] if note else []))
    return result(5, not diffs, evidence, time.perf_counter() - t0,
                  {"differences": diffs, "baselines": used, "recorded_now": list(recorded_now)})


# -- 6. egress ---------------------------------------------------------------------------------

def no_egress(plan: Plan, live_env: Mapping[str, Mapping[str, str] | None]) -> CheckResult:
    t0 = time.perf_counter()
    attempts = egress.read_log(Path(plan.egress_log))
    names = [p.name for p in plan.processes]
    unhooked = [n for n in names
                if egress.ENV_LOG not in (live_env.get(n) or {})
                or "sovctl.runtime.launch" not in next(p for p in plan.processes
                                                       if p.name == n).argv.args]
    problems = []
    if unhooked:
        problems.append(f"egress recorder not confirmed in {', '.join(unhooked)}")
    if attempts:
        listed = "; ".join(f"{a.get('component')} {a.get('event')} {a.get('target')}"
                           for a in attempts[:20])
        more = f" (+{len(attempts) - 20} more)" if len(attempts) > 20 else ""
        problems.append(f"{len(attempts)} egress attempt(s): {listed}{more}")
    evidence = "; ".join(problems) if problems else (
        f"0 attempts to reach a non-loopback address or resolve a name, recorded by the audit "
        f"hooks in {', '.join(names)}")
    return result(6, not problems, evidence, time.perf_counter() - t0,
                  {"attempts": attempts, "log": plan.egress_log, "unhooked": unhooked})


# -- 7. configuration --------------------------------------------------------------------------

def read_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def _last_value(args: Sequence[str], flag: str) -> str | None:
    """The value a command line gives `flag` (the last occurrence wins, as with argparse)."""
    value = None
    for i, a in enumerate(args[:-1]):
        if a == flag:
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    if args and args[-1].startswith(flag + "="):
        value = args[-1].split("=", 1)[1]
    return value


def configuration(home: Home, configured: Plan, run_plan: Plan,
                  live_env: Mapping[str, Mapping[str, str] | None] | None) -> CheckResult:
    from sovctl.apikey import read_api_key
    from sovctl.net import is_loopback

    t0 = time.perf_counter()
    problems = []
    parts = []
    # Routes: the table the gateway ran with, else the one it would run with.
    routes_file = Path(run_plan.routes_file)
    try:
        table = RoutesTable.read(routes_file)
        source = "routes.json"
    except ConfigError:
        table = routes_table(configured, home)
        source = "the planned routing table"
    routes = table.routes
    not_local = [f"{r.model} ({r.kind})" for r in routes if r.kind != "local"]
    if not_local:
        problems.append(f"routes not local: {', '.join(not_local)}")
    else:
        parts.append(f"{source}: every route local ({', '.join(r.model for r in routes)})")
    wide = [r.model for r in routes if not r.upstream.startswith("http://127.0.0.1:")]
    runtimes_wide = [p.name for p in configured.processes
                     if p.kind == "runtime" and _last_value(p.argv.args, "--host") != "127.0.0.1"]
    if wide or runtimes_wide:
        names = ", ".join(sorted(set(wide + runtimes_wide)))
        problems.append(f"runtimes beyond loopback: {names}")
    # Gateway exposure.
    if is_loopback(configured.host):
        parts.append(f"gateway on loopback {configured.host}:{configured.port}")
    elif configured.api_key_required and read_api_key(home):
        parts.append(f"gateway on {configured.host}:{configured.port} requires the API key")
    else:
        problems.append(f"gateway on non-loopback {configured.host} without an API key")
    # Telemetry off, in the plan and, when the stack ran, in each running process.
    telemetry_ok = True
    for p in run_plan.processes:
        bad = [k for k, v in TELEMETRY_ENV.items() if p.argv.env.get(k) != v]
        if bad:
            telemetry_ok = False
            problems.append(f"{p.name} is planned without {', '.join(bad)}")
        if live_env is None:
            continue
        env = live_env.get(p.name)
        if env is None:
            telemetry_ok = False
            problems.append(f"{p.name}: environment of the running process not read")
            continue
        bad = [k for k, v in TELEMETRY_ENV.items() if env.get(k) != v]
        if bad:
            telemetry_ok = False
            problems.append(f"{p.name} ran without "
                            + ", ".join(f"{k}={TELEMETRY_ENV[k]}" for k in bad))
    if telemetry_ok:
        where = (f"in the plan and in the running {', '.join(live_env)}" if live_env is not None
                 else "in the plan (the stack did not run, so no running process was read)")
        parts.append("telemetry off ("
                     + ", ".join(f"{k}={v}" for k, v in TELEMETRY_ENV.items()) + f") {where}")
    evidence = "; ".join(problems + parts)
    return result(7, not problems, evidence, time.perf_counter() - t0,
                  {"routes": routes, "host": configured.host,
                   "api_key_required": configured.api_key_required})
