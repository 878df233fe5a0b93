"""The eight checks of the blackout audit. Each returns a CheckResult with its evidence in words
(and, where a list helps, in `details`). A check that could not run is a FAIL that says why:
nothing passes by default.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sovctl.apikey import read_api_key
from sovctl.audit import baseline
from sovctl.audit.baseline import describe_call, requests_for
from sovctl.audit.stack import wait_ready
from sovctl.audit.tracing import SELF_TEST_TARGET, Observed, Tracer
from sovctl.config import parse_endpoint
from sovctl.errors import ConfigError
from sovctl.home import Home
from sovctl.ledger import store as ledger
from sovctl.net import ip_literal, is_loopback
from sovctl.netns import current_netns
from sovctl.runtime import egress, tunnel
from sovctl.runtime.cluster import bind_scope
from sovctl.runtime.documents import LOCAL, ProcessKind, Route, RoutesTable, WorkerStatus
from sovctl.runtime.plan import OFFLINE_ENV, Plan, ServedModel, routes_table
from sovctl.runtime.procs import ProcessSpec
from sovctl.store.integrity import check
from sovctl.units import human_bytes

if TYPE_CHECKING:
    from sovctl.audit.baseline import Exchange
    from sovctl.audit.bridge import Bridge
    from sovctl.runtime.documents import ProcessState

NAMES = {
    1: "isolation",
    2: "weights",
    3: "stack starts",
    4: "service",
    5: "behaviour",
    6: "no egress",
    7: "configuration",
    8: "exception routes",
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


def isolation(mode: str, outer_netns: str, bridges: Sequence[Bridge] = (),
              bridge_error: str | None = None, timeout: float = 3.0) -> CheckResult:
    """A namespace of its own, loopback its only interface, no public address or name within
    reach; for a fleet, the audit's relay to each [cluster] worker (on its own port only) as
    the one way out."""
    t0 = time.perf_counter()

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
    if bridge_error is not None:
        problems.append(f"the bridge to the [cluster] workers could not be set up: "
                        f"{bridge_error}")
    elif bridges:
        bridged = {b.literal for b in bridges}
        parts.append("the one way out: the audit's relay to the [cluster] workers "
                     + ", ".join(f"{b.endpoint}" + (f" ({b.literal})" if b.literal != b.endpoint
                                                    else "") for b in bridges)
                     + ", each address on lo, its port only")
        details["bridged"] = sorted(bridged)
        for address in dict.fromkeys(b.address for b in bridges):
            # Another port of a worker's address must stay out of reach: only the relay's is.
            port = next(p for p in range(9, 65536) if f"{address}:{p}" not in bridged)
            why = _connect(address, port, timeout)
            details["connects"][f"{address}:{port}"] = why or "connected"
            if why is None:
                problems.append(f"TCP connect to {address}:{port}, not a bridged port, "
                                "succeeded")
            else:
                parts.append(f"connect {address}:{port} failed ({why})")
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
    """Every served blob (a projector too, as MODEL/mmproj) re-hashed in full against
    sovctl.lock; no network involved."""
    t0 = time.perf_counter()
    blobs = [(m.name, m.sha256, m.size) for m in models]
    blobs += [(f"{m.name}/mmproj", m.mmproj_sha256, m.mmproj_size) for m in models if m.mmproj]
    rows = []
    bad = []
    for name, sha256, size in blobs:
        r = check(home, name, sha256, size, full=True)
        rows.append({"model": name, "sha256": sha256, "status": r.status,
                     "method": r.method, "actual": r.actual})
        if r.ok:
            continue
        if r.status == "missing":
            bad.append(f"{name}: blob missing (lock sha256 {sha256[:12]}…)")
        else:
            found = f"{r.actual[:12]}…" if r.actual and len(r.actual) == 64 else r.actual
            bad.append(f"{name}: blob does not match the lock (lock sha256 "
                       f"{sha256[:12]}…, found {found})")
    if bad:
        evidence = "; ".join(bad)
    else:
        evidence = ", ".join(f"{name} sha256 {sha256[:12]}… ok" for name, sha256, _ in blobs) \
            + " (full re-hash against sovctl.lock)"
    return result(2, not bad, evidence, time.perf_counter() - t0, {"models": rows})


# -- 3. the stack starts -----------------------------------------------------------------------

def stack_starts(base: str, headers: Mapping[str, str], started_in: float,
                 start_error: str | None,
                 processes: Callable[[], Sequence[ProcessState]] | None = None) -> CheckResult:
    """Up and ready; a clustered runtime with every one of its workers, since one that started
    without some (as the supervisor lets it, degraded) is not the fleet as configured."""
    if start_error is not None:
        return result(3, False, f"the stack did not start: {start_error}", started_in)
    ready = wait_ready(base, dict(headers))
    seconds = started_in + ready.seconds
    if not ready.ok:
        return result(3, False, f"/ready did not answer 200 within {ready.seconds:.0f}s of the "
                      f"start; last: {ready.last}", seconds)
    waited = f" (after {ready.seconds:.1f}s, {ready.polls} polls)" if ready.polls > 1 else ""
    evidence = f"up in {started_in:.1f}s; GET /ready {ready.last}{waited}"
    fleet = [(p.name, w) for p in (processes() if processes else ()) for w in p.workers]
    lost = [f"{name} runs without worker {w.endpoint} ({w.reason})" for name, w in fleet
            if w.status != WorkerStatus.IN_USE]
    if lost:
        return result(3, False, "not the fleet as configured: " + "; ".join(lost)
                      + f" ({evidence})", seconds, {"ready": ready.body, "polls": ready.polls})
    if fleet:
        evidence += "; " + ", ".join(
            f"{name}'s layers on worker {w.endpoint} ({human_bytes(w.holds)})" for name, w in fleet)
    return result(3, True, evidence, seconds, {
        "ready": ready.body, "polls": ready.polls,
        "workers": [{"process": name, "endpoint": w.endpoint, "holds": w.holds}
                    for name, w in fleet]})


# -- 4. service --------------------------------------------------------------------------------

def _skipped(exchange: Exchange) -> list[str]:
    """Per model, the fixed requests it did not get and why, e.g. 'smol: tool_call skipped
    (no tool support in its template)'."""
    return [f"{name}: " + ", ".join(f"{request} skipped ({why})" for request, why in skipped)
            for name, skipped in exchange.skipped.items()]


def service(models: Sequence[ServedModel], exchange: Exchange) -> CheckResult:
    parts = []
    problems = []
    for a in exchange.answers:
        if a.ok:
            vectors, text = a.vectors or [[]], a.text or ""
            if a.request == "embeddings":
                what = f"{len(vectors)}x{len(vectors[0])} vectors"
            elif a.request == "chat_stream":
                what = f"{a.events} events, {len(text)} chars"
            elif a.request == "tool_call":
                what = describe_call(a.tool_call)
            elif a.request == "rerank":
                what = (f"{len(a.scores or [])} documents scored, best first "
                        f"{baseline.ranking(a.scores or [])}")
            elif a.request == "image":
                what = f"{len(text)} chars, prompt of {a.prompt_tokens} tokens with the image"
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
                                       ("rerank", "rerank" in roles),
                                       ("completions", bool(roles & {"chat", "completion"})))
               if not have]
    if missing:
        parts.append(f"not served by this stack, so not exercised: {', '.join(missing)}")
    parts += _skipped(exchange)
    expected = sum(len(requests_for(m, exchange.capabilities.get(m.name))[0]) for m in models)
    if len(exchange.answers) != expected:
        problems.append(f"{len(exchange.answers)} of {expected} requests were sent")
    evidence = "; ".join(problems + parts)
    return result(4, not problems, evidence, exchange.seconds,
                  {"answers": [{"model": a.model, "request": a.request, "status": a.status,
                                "seconds": round(a.seconds, 3), "error": a.error}
                               for a in exchange.answers],
                   "skipped": {n: [{"request": r, "why": w} for r, w in s]
                               for n, s in exchange.skipped.items()}})


# -- 5. behaviour --------------------------------------------------------------------------------

def behaviour(home: Home, models: Sequence[ServedModel], exchange: Exchange,
              recorded_now: Sequence[str], replaced: Mapping[str, str],
              served_by: Mapping[str, Mapping[str, str]]) -> CheckResult:
    """`replaced`: model -> the engine its old baseline was recorded with, for the models whose
    baseline came from another runtime and was recorded again before the blackout."""
    t0 = time.perf_counter()
    diffs: list[str] = []
    parts: list[str] = []
    used: dict[str, str] = {}
    notes: list[str] = []
    unrecorded: dict[str, list[str]] = {}  # model -> the requests its baseline predates
    for m in models:
        found = baseline.find(home, m)
        if found.status == "missing":
            diffs.append(f"{m.name}: no baseline recorded (run 'sovctl audit baseline')")
            continue
        used[m.name] = str(found.path)
        answers = exchange.for_model(m.name)
        d = baseline.compare(m, found, answers)
        older = baseline.unrecorded(found, answers)
        # Same runtime (another one is recorded again, never compared), maybe another build:
        # name both, as a build may legitimately change the answers.
        engine, was = served_by.get(m.name), (found.doc or {}).get("engine")
        if d and engine and was and was != engine:
            d.append(f"{m.name}: baseline recorded with {baseline.describe_engine(was)}, "
                     f"now served by {baseline.describe_engine(engine)}")
        diffs += d
        if not d:
            worst = baseline.max_embedding_diff(found, answers)
            ranked = baseline.max_rerank_diff(found, answers)
            same = ", ".join(a.request for a in answers if a.request not in
                             ("embeddings", "rerank") and a.request not in older)
            bits = [f"{same} identical"] if same else []
            if worst is not None:
                bits.append(f"embeddings max |Δ| {worst:.2g} ≤ {baseline.EMBEDDING_TOLERANCE:g}")
            if ranked is not None:
                bits.append(f"rerank order identical, scores max |Δ| {ranked:.2g} ≤ "
                            f"{baseline.RERANK_TOLERANCE:g}")
            when = found.doc.get("recorded_at") if found.doc else "?"
            parts.append(f"{m.name}: {'; '.join(bits)} (baseline of {when})")
        if older:
            unrecorded[m.name] = older
            notes.append(f"{m.name}: {', '.join(older)} not compared: its baseline predates "
                         "them (record one with 'sovctl audit baseline')")
    new = [n for n in recorded_now if n not in replaced]
    if new:
        notes.append(f"baseline recorded just now, with the network available, for "
                     f"{', '.join(new)} (none existed)")
    for name, was in replaced.items():
        engine = served_by.get(name)
        notes.append(f"{name}: its baseline was recorded with {was}, and this stack serves it "
                     f"with {baseline.describe_engine(engine)}; answers of different runtimes "
                     "are not comparable, so it was not compared but recorded again just now, "
                     "with the network available")
    evidence = "; ".join(diffs + parts + notes + _skipped(exchange))
    return result(5, not diffs, evidence, time.perf_counter() - t0,
                  {"differences": diffs, "baselines": used, "recorded_now": list(recorded_now),
                   "unrecorded": unrecorded,
                   "replaced": dict(replaced), "engines": dict(served_by),
                   "skipped": {n: dict(s) for n, s in exchange.skipped.items()}})


# -- 6. egress ---------------------------------------------------------------------------------

LAUNCH = "sovctl.runtime.launch"


def recorded_attempts(plan: Plan) -> list[dict[str, Any]]:
    """Every egress attempt the audit hooks and the tracer recorded for the plan's processes."""
    attempts = egress.read_log(Path(plan.egress_log))
    for p in plan.processes:
        trace_log = p.argv.env.get(egress.ENV_TRACE)
        if trace_log:
            attempts += egress.read_trace(Path(trace_log), p.name)
    return sorted(attempts, key=lambda a: float(a.get("time", 0)))


def _describe(a: Mapping[str, Any]) -> str:
    how = str(a["recorder"]) + (", a name lookup" if a.get("lookup") else "")
    return f"{a['component']} {a['event']} {a['target']} [{how}]"


def _native(p: ProcessSpec) -> bool:
    """Whether the process runs a program of its own (`launch NAME --exec ...`), or anything
    not started through the launcher: no audit hook is in it."""
    args = p.argv.args
    return LAUNCH not in args or args[args.index(LAUNCH) + 2] == "--exec"


# Seconds around a routed request's time in the ledger within which the gateway's attempts are
# its own: the ledger's start is taken from a monotonic clock, the recorders' from the wall's.
ROUTED_SLACK_S = 0.5


def _provider_addresses(plan: Plan) -> dict[str, tuple[str, int]]:
    found = {}
    for r in plan.frontier:
        u = urlsplit(r.upstream)
        if r.provider is not None and u.hostname:
            found[r.provider.name] = (u.hostname, u.port or (443 if u.scheme == "https" else 80))
    return found


def _port(target: str) -> int | None:
    port = target.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def routed_apart(plan: Plan, attempts: Sequence[Mapping[str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[Mapping[str, Any]]]:
    """(the gateway's attempts to reach a configured provider for an opted-in request, every
    other attempt). An attempt is a provider's when the gateway made it while the ledger has
    a request to that provider in flight, and it is the provider's name lookup, a DNS query,
    or a connect to the provider's port; of several such requests, the nearest in time owns
    it (a DNS query going to a provider known by name). Whatever else happens stays egress."""
    addresses = _provider_addresses(plan)
    windows = [w for w in (ledger.routed(Path(plan.ledger)) if plan.ledger and addresses
                           else []) if w.route in addresses]
    routed: list[dict[str, Any]] = []
    rest: list[Mapping[str, Any]] = []
    for a in attempts:
        t, target = float(a.get("time", 0)), str(a.get("target", ""))
        owners = []
        for w in windows if a.get("component") == "gateway" else ():
            host, port = addresses[w.route]
            if a.get("lookup") or target == host or _port(target) == port:
                distance = max(w.start - t, t - w.end, 0.0)
                # A provider addressed by IP makes no lookup: it ranks after one with a name.
                unlikely = bool(a.get("lookup")) and ip_literal(host) is not None
                if distance <= ROUTED_SLACK_S:
                    owners.append((distance, unlikely, w))
        if owners:
            owner = min(owners, key=lambda o: o[:2])[2]
            routed.append({**a, "provider": owner.route, "model": owner.model})
        else:
            rest.append(a)
    return routed, rest


def cluster_apart(plan: Plan, attempts: Sequence[Mapping[str, Any]]
                  ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(a clustered runtime's attempts to reach one of its [cluster] workers, every other
    attempt). Those are the cluster's own traffic; anything else the runtime tries stays egress."""
    workers = {p.name: set(p.workers) for p in plan.processes if p.workers}
    hosts = {name: {w.partition(":")[0] for w in ws} for name, ws in workers.items()}
    mine: list[Mapping[str, Any]] = []
    rest: list[Mapping[str, Any]] = []
    for a in attempts:
        component, target = str(a.get("component", "")), str(a.get("target", ""))
        if target in workers.get(component, ()) or (
                a.get("lookup") and target in hosts.get(component, ())):
            mine.append(a)
        else:
            rest.append(a)
    return mine, rest


def no_egress(plan: Plan, observed: Mapping[str, Observed | None], tracer: Tracer
              ) -> CheckResult:
    """No process attempted egress, and every process was watched by a recorder that can see
    what it runs: the audit hook sees Python only, so a native program needs the tracer. The
    gateway's attempts to reach a configured provider for an opted-in request are listed
    apart: they are the routing the operator configured, not egress."""
    t0 = time.perf_counter()
    routed, attempts = routed_apart(plan, recorded_attempts(plan))
    to_workers, attempts = cluster_apart(plan, attempts)
    rows = []
    by: dict[str, list[str]] = {egress.STRACE: [], egress.HOOK: []}
    untraced_native: list[str] = []
    unconfirmed: list[str] = []
    for p in plan.processes:
        native = _native(p)
        trace_log = p.argv.env.get(egress.ENV_TRACE)
        o = observed.get(p.name)
        program = o.program if o is not None else "?"
        recorders = []
        if trace_log and o is not None and o.tracer_pid is not None:
            recorders.append(egress.STRACE)
        if not native and o is not None and egress.ENV_LOG in (o.env or {}):
            recorders.append(egress.HOOK)
        for r in recorders:
            by[r].append(f"{p.name} ({program})")
        rows.append({"process": p.name, "program": o.exe if o else "", "native": native,
                     "pid": o.serving_pid if o else None,
                     "tracer_pid": o.tracer_pid if o else None, "recorders": recorders,
                     "trace_log": trace_log})
        if trace_log and egress.STRACE not in recorders:
            unconfirmed.append(f"strace in {p.name}")  # planned, yet not attached
        elif not recorders and native:
            untraced_native.append(f"{p.name} ({program})")
        elif not recorders:
            unconfirmed.append(f"the audit hook in {p.name}")
    problems = []
    if untraced_native:
        problems.append(
            f"no system call tracer watched {', '.join(untraced_native)}: native code, which no "
            f"audit hook sees, so no attempt of theirs could have been recorded ({tracer.problem})")
    if unconfirmed:
        problems.append("egress recorder not confirmed in the running stack: "
                        + ", ".join(unconfirmed))
    if attempts:
        listed = "; ".join(_describe(a) for a in attempts[:20])
        more = f" (+{len(attempts) - 20} more)" if len(attempts) > 20 else ""
        problems.append(f"{len(attempts)} egress attempt(s): {listed}{more}")
    watched = []
    if by[egress.STRACE]:
        calls = ", ".join(egress.TRACED_SYSCALLS)
        watched.append(f"by strace {tracer.version} ({calls} of every thread and child) in "
                       + ", ".join(by[egress.STRACE]))
    if by[egress.HOOK]:
        watched.append("by the audit hook in " + ", ".join(by[egress.HOOK]))
    parts = ["recorded " + ", and ".join(watched)] if watched else []
    if routed:
        listed = "; ".join(f"{_describe(a)} for {a['model']}" for a in routed[:10])
        parts.append(f"listed apart, not egress: {len(routed)} attempt(s) of the gateway to "
                     f"reach a configured provider for an opted-in request ({listed})")
    if to_workers:
        targets = sorted({str(a.get("target")) for a in to_workers})
        parts.append(f"listed apart, not egress: {len(to_workers)} attempt(s) to reach the "
                     f"configured [cluster] workers ({', '.join(targets)})")
    if tracer.usable:
        host, port = SELF_TEST_TARGET
        parts.append(f"the tracer's self-test recorded a deliberate connect from native code "
                     f"(bash) to {host}:{port} in this namespace")
    elif not untraced_native:
        parts.append(f"no system call tracer, so native code inside these processes is not "
                     f"covered ({tracer.problem})")
    evidence = "; ".join(problems + parts) if problems else (
        "0 attempts to reach a non-loopback address or resolve a name; " + "; ".join(parts))
    return result(6, not problems, evidence, time.perf_counter() - t0, {
        "attempts": attempts, "routed": routed, "cluster": to_workers, "log": plan.egress_log,
        "processes": rows,
        "unrecorded": [*untraced_native, *unconfirmed],
        "tracer": {"path": tracer.path, "version": tracer.version, "problem": tracer.problem,
                   "self_test": dict(tracer.self_test)},
    })


# -- 7. configuration --------------------------------------------------------------------------

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


def _public_face(home: Home, configured: Plan, run_plan: Plan, auth_required: bool
                 ) -> tuple[list[str], list[str]]:
    """(problems, evidence) of the tunnel, when one is configured: the gateway requires the
    key, the tunnel forwards to the gateway alone, and the public host's key is pinned."""
    t = configured.tunnel
    if t is None:
        return [], []
    problems, parts = [], []
    if auth_required and configured.api_key_required and read_api_key(home):
        parts.append(f"public face {t.public} through {t.via}: the gateway requires the API key")
    else:
        problems.append(f"the tunnel through {t.via} exposes a gateway that does not require "
                        "the API key")
    proc = next((p for p in configured.processes if p.kind == ProcessKind.TUNNEL), None)
    args = list(proc.argv.args) if proc else []
    gateway = tunnel.gateway_target(configured.host, configured.port)
    found = tunnel.forwards(args)
    # Besides the public forward to the gateway, only the health probe's forward, whose end
    # listens on this machine's loopback.
    stray = [f"{flag} {spec}" for flag, spec in found
             if not ((flag == "-R" and spec.endswith(":" + gateway))
                     or (flag == "-L" and spec.startswith("127.0.0.1:")))]
    if stray or not any(flag == "-R" for flag, _ in found):
        problems.append("the tunnel forwards something besides the gateway: "
                        + (", ".join(stray) or "no forward to the gateway at all"))
    else:
        parts.append(f"it forwards to the gateway ({gateway}) alone")
    keys = tunnel.pinned_keys(t)
    options = {args[i + 1] for i, a in enumerate(args[:-1]) if a == "-o"}
    unchecked = [o for o in tunnel.host_key_options(t) if o not in options]
    known_hosts = Path(t.known_hosts)
    if not keys:
        problems.append(f"no host key of {t.host_key_name} is pinned in {known_hosts}")
    elif unchecked:
        problems.append(f"the tunnel's ssh runs without {', '.join(unchecked)}")
    elif known_hosts.stat().st_mode & 0o022:
        problems.append(f"{known_hosts}, the tunnel's pinned host keys, is writable by others")
    else:
        parts.append(f"host key of {t.host_key_name} pinned "
                     f"({', '.join(map(str, keys))}) and checked strictly")
    if run_plan.tunnel is None:
        parts.append(f"the tunnel was left out of this run: there is no network to reach "
                     f"{t.host} from here")
    return problems, parts


def configuration(home: Home, configured: Plan, run_plan: Plan,
                  live_env: Mapping[str, Mapping[str, str] | None] | None) -> CheckResult:
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
    routes = [r for r in table.routes if r.kind == LOCAL]
    providers = [r for r in table.routes if r.provider is not None]
    other = [f"{r.model} ({r.kind})" for r in table.routes
             if r.kind != LOCAL and r.provider is None]
    if other:
        problems.append(f"routes neither local nor a configured provider: {', '.join(other)}")
    else:
        parts.append(f"{source}: every route local ({', '.join(r.model for r in routes)})")
    if providers:
        parts.append("besides, exception routes a request takes only by naming them "
                     "(frontier/NAME/MODEL), never when marked X-Sovctl-Private: " + ", ".join(
                         f"{r.model} -> {r.upstream}" for r in providers))
    wide = [r.model for r in routes if not r.upstream.startswith("http://127.0.0.1:")]
    runtimes_wide = [p.name for p in configured.processes
                     if p.kind == ProcessKind.RUNTIME
                     and _last_value(p.argv.args, "--host") != "127.0.0.1"]
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
    face = _public_face(home, configured, run_plan, table.auth_required)
    problems += face[0]
    parts += face[1]
    exposed, private = _worker_exposure(configured)
    problems += exposed
    parts += private
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
                  {"routes": table.routes, "host": configured.host,
                   "api_key_required": configured.api_key_required,
                   "tunnel": configured.tunnel})


def _worker_exposure(configured: Plan) -> tuple[list[str], list[str]]:
    """(problems, evidence): llama.cpp's RPC is unauthenticated, so a [cluster] worker on an
    address beyond a private network lends its memory, and the tensors it holds, to anyone."""
    workers = sorted({w for p in configured.processes for w in p.workers})
    if not workers:
        return [], []
    scopes = {w: bind_scope(parse_endpoint(w)[0], allow_unauthenticated=True) for w in workers}
    public = [w for w, scope in scopes.items() if scope == "public"]
    if public:
        return [f"[cluster] workers on a public address, where their unauthenticated RPC is "
                f"open to anyone who reaches it: {', '.join(public)}"], []
    return [], ["[cluster] workers on private addresses: " + ", ".join(
        f"{w} ({scope})" for w, scope in scopes.items())]


# -- 8. exception routes ------------------------------------------------------------------------

# A frontier request in the blackout must fail within this: its connect has no route to take.
FAIL_FAST_S = 5.0


def probe_model(route: Route) -> str:
    """The model a probe names on a provider route: its first allowed one (any other is
    refused before the gateway tries to reach the provider)."""
    assert route.provider is not None
    return f"{route.model}/{next(iter(route.provider.models))}"


@dataclass(frozen=True)
class RouteProbe:
    """One request the blackout sends down a route, and how it was answered."""

    what: str  # "frontier/NAME/..." or the local model
    status: int  # 0: no answer at all
    seconds: float
    error: str


def _post(base: str, headers: Mapping[str, str], endpoint: str, body: Mapping[str, Any],
          what: str) -> RouteProbe:
    import httpx

    t0 = time.perf_counter()
    try:
        r = httpx.post(base + endpoint, json=dict(body), headers=dict(headers), timeout=60,
                       trust_env=False)
        status, err = r.status_code, "" if r.status_code == 200 else r.text[:300]
    except httpx.HTTPError as e:
        status, err = 0, f"{type(e).__name__}: {e}"[:300]
    return RouteProbe(what, status, time.perf_counter() - t0, err)


def probe_routes(base: str, headers: Mapping[str, str], plan: Plan) -> list[RouteProbe]:
    """One opted-in request to each configured provider (on its kind's surface), then one
    request to a local model: the routed ones must fail fast, and the local one must still be
    answered."""
    probes = []
    for r in plan.frontier:
        model = probe_model(r)
        # On the surface the provider speaks: Anthropic's Messages, or Chat Completions.
        anthropic = r.provider is not None and r.provider.kind == "anthropic"
        probes.append(_post(base, headers, "/v1/messages" if anthropic
                            else "/v1/chat/completions", {
            "model": model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "ping"}]}, model))
    m = next((m for m in plan.models if m.role in ("chat", "completion")), None)
    if m is not None:
        probes.append(_post(base, headers, "/v1/completions", {
            "model": m.name, "prompt": "Once upon a time", "max_tokens": 2,
            "temperature": 0}, m.name))
    elif plan.models:
        first = plan.models[0]
        # Roles are kept apart: a reranker answers no embeddings request.
        endpoint, body = (("/v1/rerank", {"query": "ping", "documents": ["pong"]})
                          if first.role == "rerank" else ("/v1/embeddings", {"input": "ping"}))
        probes.append(_post(base, headers, endpoint, {"model": first.name, **body}, first.name))
    return probes


def exception_routes(plan: Plan, probes: Sequence[RouteProbe],
                     placeholder_keys: Sequence[str]) -> CheckResult:
    """With providers configured, their requests fail fast with 502 in the blackout, and the
    local requests sent after them still succeed."""
    if not plan.frontier:
        return result(8, True, "no frontier provider configured: no request can be routed out",
                      0.0)
    problems, parts = [], []
    routed = {probe_model(r) for r in plan.frontier}
    for p in probes:
        if p.what in routed:
            if p.status == 502 and p.seconds <= FAIL_FAST_S:
                parts.append(f"{p.what} 502 in {p.seconds:.2f}s (no route out)")
            else:
                got = f"status {p.status}" if p.status else f"no answer ({p.error})"
                problems.append(f"{p.what}: {got} after {p.seconds:.2f}s, not a 502 within "
                                f"{FAIL_FAST_S:.0f}s")
        elif p.status == 200:
            parts.append(f"then local {p.what} 200 ({p.seconds:.2f}s)")
        else:
            problems.append(f"local {p.what} failed after the routed requests: status "
                            f"{p.status} {p.error}")
    if placeholder_keys:
        parts.append(f"${', $'.join(placeholder_keys)} unset here: a placeholder key stood in "
                     "(nothing can leave the namespace)")
    return result(8, not problems, "; ".join(problems + parts), sum(p.seconds for p in probes),
                  {"probes": [asdict(p) for p in probes]})
