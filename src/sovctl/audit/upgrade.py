"""`sovctl upgrade` and `sovctl rollback`: a model's weights changed on purpose, compared first,
switched without a lost request, and switched back the same way.

upgrade NAME REF:
 1. REF into the store as NAME's candidate, beside its pin (store.pull.pull_candidate):
    nothing served changes;
 2. a stack of the comparison's own (its run directory under HOME/audit/upgrade, started
    through ops.stack as the audit's are) serves the pin as "current" and the candidate as
    "candidate", both with NAME's settings; each gets the audit's fixed requests
    (audit.baseline) and the operator's golden prompts ([eval.NAME] of sovctl.toml), and its
    tokens/s and memory are measured; the stack is stopped;
 3. the comparison is filed under HOME/audit/upgrades/NAME/sha256-<candidate>.json with the
    candidate's answers, which become NAME's baseline if it is applied.
upgrade NAME [REF] --apply: the candidate's blob re-hashed in full; a running stack serving
 NAME switched live (sovctl.runtime.switch: the candidate's runtime starts beside the old one,
 takes the traffic once healthy, and the old one stops once its requests end); the lock's
 entry takes the candidate's pin and keeps the one it had as `previous`; the candidate's
 baseline recorded; the change noted for the next audit report.
rollback NAME: the same switch to `previous`; the pin it leaves becomes `previous` in turn.
No baseline is recorded (the previous pin's is still on file).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sovctl import config
from sovctl.audit import baseline, stack
from sovctl.audit.report import record_change, versions
from sovctl.config import EvalCase, ModelSettings, Settings
from sovctl.errors import CheckFailed, IntegrityError, NotFoundError, RuntimeStartError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.netns import current_netns
from sovctl.result import jsonable, utcnow
from sovctl.runtime import control
from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.plan import ServedModel
from sovctl.runtime.switch import SwitchRequest
from sovctl.store import gguf_info, integrity
from sovctl.store.blobs import BlobStore
from sovctl.store.lock import Lock, LockEntry
from sovctl.store.pull import pull_candidate
from sovctl.store.sources import ProgressFactory

Progress = Callable[[str], None]

# The names the comparison's stack serves the two under.
CURRENT, CANDIDATE = "current", "candidate"
COMPARISON_SCHEMA = "sovctl.upgrade.comparison/v1"
# The generation measured for tokens/s: the requests, and the tokens each asks for.
SPEED_RUNS = 3
SPEED_TOKENS = 64
# Beyond the supervisor's start timeout, how long a live switch may take to be over: the old
# runtime's requests in flight end first.
DRAIN_WAIT_S = 60.0


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Side:
    """One of the two pins compared, and its figures."""

    sha256: str
    size: int
    ref: str
    checks_passed: int
    checks_total: int
    tokens_per_s: float | None  # measured (tokens_per_s_source says how); None: not measured
    tokens_per_s_source: str
    memory_held: int | None  # bytes resident, measured by the supervisor; None: not known
    memory_estimated: int  # bytes, the plan's estimate (sovctl.sizing)


@dataclass(frozen=True)
class AnswerPair:
    """One request's answers from the two, and whether they differ."""

    request: str  # a fixed request's id ("chat", "embeddings", ...) or "eval:NAME"
    current: str
    candidate: str
    changed: bool


@dataclass(frozen=True)
class Check:
    """One check on both: a fixed request that must be answered, or an [eval] expectation."""

    name: str
    kind: str  # "answered" | "exact" | "regex" | "json_schema" | "tool"
    current: bool
    candidate: bool
    current_detail: str = ""  # why it failed
    candidate_detail: str = ""


@dataclass(frozen=True)
class Comparison:
    name: str
    role: str
    current: Side
    candidate: Side
    answers: tuple[AnswerPair, ...]
    checks: tuple[Check, ...]
    skipped: tuple[str, ...]  # requests or cases not sent, and why
    regressions: tuple[str, ...]  # checks the current passes and the candidate fails
    compared_at: str
    seconds: float
    pulled: str  # what the candidate's pull did: "imported", "downloaded", "linked", ...
    path: str = ""  # where it is filed

    @property
    def changed(self) -> tuple[AnswerPair, ...]:
        return tuple(a for a in self.answers if a.changed)


@dataclass(frozen=True)
class Switched:
    """A model switched to other weights, in the lock and, where a stack served it, live."""

    name: str
    why: str  # "upgrade" | "rollback"
    from_sha256: str
    to_sha256: str
    at: str
    live: bool  # a running stack was switched without a lost request
    process: str = ""  # its runtime, when one ran
    seconds: float = 0.0  # the live switch, from the request to its end
    drain_seconds: float = 0.0  # the old runtime finishing its requests in flight
    phase: str = ""  # the live switch's outcome: "done", or "draining" (still finishing)
    baseline: str = ""  # the baseline recorded for the new pin (an upgrade's)

    @property
    def text(self) -> str:
        verb = "upgraded" if self.why == "upgrade" else "rolled back"
        return (f"{self.name} {verb} from sha256 {self.from_sha256[:12]} to "
                f"{self.to_sha256[:12]} at {self.at}")


@dataclass(frozen=True)
class UpgradeResult:
    comparison: Comparison | None
    applied: Switched | None


# -- the comparison -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CompareHome(stack.RunHome):
    """The operator's store, settings and secrets; a run directory and a lock of the
    comparison's own, which pins the two compared under the names it serves them as."""

    @property
    def lock_path(self) -> Path:
        return self.run_root / "sovctl.lock"


def comparison_path(home: Home, name: str, sha256: str) -> Path:
    return home.root / "audit" / "upgrades" / name / f"sha256-{sha256}.json"


def _role(home: Home, cfg: Settings, entry: LockEntry) -> tuple[str, ModelSettings | None]:
    """NAME's role and its [models.*] section: as configured, else as the running stack serves
    it, else as its GGUF header says."""
    configured = next((m for m in cfg.models.values() if m.model == entry.name), None)
    if configured is not None and configured.role:
        return configured.role, configured
    running = control.status(home)
    served = next((p.role for p in running.processes
                   if p.kind == ProcessKind.RUNTIME and p.model == entry.name and p.role), None)
    if running.running and served:
        return served, configured
    facts = gguf_info.facts_for(home, entry.sha256, BlobStore(home).path(entry.sha256))
    return ("rerank" if facts.rerank else "embedding" if facts.embedding else "chat"), configured


def _cases(cfg: Settings, name: str, role: str) -> tuple[dict[str, EvalCase], list[str]]:
    """The [eval] cases for this model, and those left out with why."""
    cases, skipped = {}, []
    for case_name, case in sorted(cfg.evals.items()):
        if case.models is not None and name not in case.models:
            continue
        if role not in ("chat", "completion"):
            skipped.append(f"eval:{case_name}: a {role} model answers no prompt")
        elif case.tool is not None and role != "chat":
            skipped.append(f"eval:{case_name}: a tool call needs a chat model")
        else:
            cases[case_name] = case
    return cases, skipped


def compare(home: Home, name: str, ref: str, *, flags: Mapping[str, Any], revision: str = "main",
            sha256: str | None = None, endpoint: str, trust_on_first_use: bool = False,
            fetch_progress: ProgressFactory | None = None, token: str | None = None,
            progress: Progress = _quiet) -> Comparison:
    """Pull REF as NAME's candidate, run both on a stack of the comparison's own, file and
    return the comparison. Nothing served changes."""
    t0 = time.perf_counter()
    pulled = pull_candidate(home, name, ref, revision=revision, sha256=sha256,
                            endpoint=endpoint, trust_on_first_use=trust_on_first_use,
                            progress=fetch_progress, token=token)
    entry = Lock.load(home).get(name)
    candidate = pulled.entry
    cfg = config.load(home, flags=flags)
    role, configured = _role(home, cfg, entry)
    cases, skipped = _cases(cfg, name, role)
    # Both loaded at once for the whole comparison, with NAME's settings, on the head alone:
    # the [cluster] workers serve the operator's stack.
    same = replace(configured or ModelSettings(model=name), role=role, load="always",
                   idle_unload="0", pin=False)
    cfg = replace(cfg, models={n: replace(same, model=n) for n in (CURRENT, CANDIDATE)},
                  cluster=replace(cfg.cluster, workers=()))
    run_home = _CompareHome(home.root, run_root=home.root / "audit" / "upgrade")
    stack.fresh_run_dir(run_home)
    Lock({CURRENT: replace(entry.pin_only(), name=CURRENT),
          CANDIDATE: replace(candidate, name=CANDIDATE)}).save(run_home)
    progress(f"starting {name} (sha256 {entry.short_sha}) and its candidate (sha256 "
             f"{candidate.short_sha}) side by side")
    for attempt in (1, 2):
        _, plan = stack.plans(run_home, run_home, cfg, [], [])
        try:
            stack.start(run_home, plan)
            break
        except RuntimeStartError as e:
            # Ports are shared with the whole machine: another program may take one between
            # planning and binding. One retry, on new ports.
            if attempt == 2:
                raise RuntimeStartError(
                    f"the comparison's stack did not start: {e.message} (nothing served "
                    "changed; the candidate stays recorded, not applied)",
                    hint=f"see {run_home.logs / (CANDIDATE + '.log')} and "
                    f"{run_home.logs / (CURRENT + '.log')}") from None
            progress("the comparison's stack did not start; retrying once on new ports")
    try:
        base, headers = stack.client_base(plan), stack.auth_headers(home, plan)
        ready = stack.wait_ready(base, headers, timeout=plan.supervision.start_timeout)
        if not ready.ok:
            raise RuntimeStartError(f"the comparison's stack did not become ready (last: "
                                    f"{ready.last})", hint=f"see the logs under {run_home.logs}")
        progress("sending the fixed requests and the [eval] cases to both")
        exchange = baseline.exercise(base, plan.models, headers)
        evals = {m.name: _run_cases(base, headers, m, cases) for m in plan.models}
        progress("measuring tokens/s")
        speed = {m.name: _speed(base, headers, m) for m in plan.models}
        held = {p.name: (p.memory_held, p.memory_estimated)
                for p in control.status(run_home).processes}
        served_by = baseline.engines(plan)
    finally:
        stack.stop(run_home)
    found = _compared(name, role, entry, candidate, exchange, evals, speed, held, skipped,
                      pulled.action, time.perf_counter() - t0)
    path = comparison_path(home, name, candidate.sha256)
    found = replace(found, path=str(path))
    model = next(m for m in plan.models if m.name == CANDIDATE)
    atomic_write(path, json.dumps({
        "schema": COMPARISON_SCHEMA,
        "comparison": jsonable(found),
        # What an apply records as NAME's baseline: the candidate's answers to the fixed
        # requests, served as NAME is, and how.
        "baseline": {"role": role, "engine": served_by[CANDIDATE], "n_ctx": model.n_ctx,
                     "network": f"host namespace {current_netns()}",
                     "answers": [dataclasses.asdict(a) for a in exchange.for_model(CANDIDATE)]},
    }, indent=1).encode())
    return found


def _compared(name: str, role: str, entry: LockEntry, candidate: LockEntry,
              exchange: baseline.Exchange, evals: Mapping[str, Sequence[_Outcome]],
              speed: Mapping[str, tuple[float | None, str]],
              held: Mapping[str, tuple[int | None, int]], skipped: list[str], pulled: str,
              seconds: float) -> Comparison:
    pairs, checks = [], []
    # A fixed request one of them was not sent (a capability the other lacks) fails there.
    sent = {n: {a.request: a for a in exchange.for_model(n)} for n in (CURRENT, CANDIDATE)}
    unsent = {n: dict(exchange.skipped.get(n, ())) for n in (CURRENT, CANDIDATE)}
    skipped = skipped + [f"{r}: {why}" for r, why in unsent[CURRENT].items()
                         if r in unsent[CANDIDATE]]
    for request in dict.fromkeys([*sent[CURRENT], *sent[CANDIDATE]]):
        a, b = sent[CURRENT].get(request), sent[CANDIDATE].get(request)
        now = _shown(a, b) if a else f"not sent: {unsent[CURRENT].get(request, '')}"
        then = _shown(b, a) if b else f"not sent: {unsent[CANDIDATE].get(request, '')}"
        pairs.append(AnswerPair(request, now, then, a is None or b is None or _differ(a, b)))
        ok_now, ok_then = a is not None and a.ok, b is not None and b.ok
        checks.append(Check(f"answers {request}", "answered", ok_now, ok_then,
                            "" if ok_now else now, "" if ok_then else then))
    for x, y in zip(evals[CURRENT], evals[CANDIDATE], strict=True):
        pairs.append(AnswerPair(f"eval:{x.case}", x.shown, y.shown, x.shown != y.shown))
        checks.append(Check(f"eval {x.case}", x.kind, x.passed, y.passed, x.detail, y.detail))

    def side(pin: LockEntry, served: str) -> Side:
        ok = [c.current if served == CURRENT else c.candidate for c in checks]
        tps, how = speed[served]
        rss, estimate = held.get(served, (None, 0))
        return Side(pin.sha256, pin.size, pin.ref, sum(ok), len(ok), tps, how, rss, estimate)

    return Comparison(
        name=name, role=role, current=side(entry, CURRENT), candidate=side(candidate, CANDIDATE),
        answers=tuple(pairs), checks=tuple(checks), skipped=tuple(skipped),
        regressions=tuple(c.name for c in checks if c.current and not c.candidate),
        compared_at=utcnow(), seconds=round(seconds, 3), pulled=pulled)


def _shown(a: baseline.Answer, other: baseline.Answer | None = None) -> str:
    """An answer in words: its text, its call, its vectors' shape (and how far they moved)."""
    if a.status != 200 or a.error:
        return f"HTTP {a.status}: {a.error}" if a.status else a.error
    if a.vectors is not None:
        shape = f"{len(a.vectors)} vectors of {len(a.vectors[0]) if a.vectors else 0}"
        worst = _worst(a, other) if other is not None else None
        return shape + (f" (max |Δ| {worst:.3g})" if worst is not None else "")
    if a.scores is not None:
        return f"{len(a.scores)} documents, best first {baseline.ranking(a.scores)}"
    if a.request == "tool_call":
        return baseline.describe_call(a.tool_call)
    return a.text or ""


def _worst(a: baseline.Answer, b: baseline.Answer) -> float | None:
    if not a.vectors or not b.vectors or len(a.vectors) != len(b.vectors) \
            or any(len(u) != len(v) for u, v in zip(a.vectors, b.vectors, strict=True)):
        return None
    return max(abs(x - y) for u, v in zip(a.vectors, b.vectors, strict=True)
               for x, y in zip(u, v, strict=True))


def _differ(a: baseline.Answer, b: baseline.Answer) -> bool:
    if a.scores is not None or b.scores is not None:
        # A reranker's answer: the baseline's own rule (the same order, scores within its
        # tolerance).
        return bool(baseline.rerank_diffs("", a.scores or [], b.scores or []))
    if a.vectors is not None or b.vectors is not None:
        worst = _worst(a, b)
        return worst is None or worst > baseline.EMBEDDING_TOLERANCE
    return (a.text, a.tool_call, a.status) != (b.text, b.tool_call, b.status)


# -- the operator's golden prompts ([eval]) -------------------------------------------------------
@dataclass(frozen=True)
class _Outcome:
    case: str
    kind: str
    passed: bool
    shown: str  # the answer, in words
    detail: str  # why it failed


def _kind(case: EvalCase) -> str:
    return next(k for k in config.EVAL_EXPECTATIONS if getattr(case, k) is not None)


def _run_cases(base: str, headers: Mapping[str, str], model: ServedModel,
               cases: Mapping[str, EvalCase]) -> list[_Outcome]:
    import httpx

    out = []
    with httpx.Client(timeout=120, trust_env=False) as client:
        for case_name, case in cases.items():
            chat = model.role == "chat"
            body: dict[str, Any] = {"model": model.name, "temperature": 0,
                                    "seed": baseline.SEED, "max_tokens": case.max_tokens}
            if chat:
                body["messages"] = ([{"role": "system", "content": case.system}]
                                    if case.system else []) + [
                    {"role": "user", "content": case.prompt}]
            else:
                body["prompt"] = case.prompt
            if case.tool is not None:
                body["tools"] = [{"type": "function", "function": {
                    "name": case.tool["name"], "description": case.tool.get("description", ""),
                    "parameters": case.tool.get("parameters", {"type": "object"})}}]
                body["tool_choice"] = "required"
            try:
                r = client.post(base + ("/v1/chat/completions" if chat else "/v1/completions"),
                                json=body, headers=dict(headers))
            except httpx.HTTPError as e:
                out.append(_Outcome(case_name, _kind(case), False, f"{type(e).__name__}: {e}",
                                    "no answer"))
                continue
            out.append(_judge(case_name, case, r.status_code, r.text, chat))
    return out


def _judge(case_name: str, case: EvalCase, status: int, text: str, chat: bool) -> _Outcome:
    """Whether an answer meets its case's expectation, and why not."""
    kind = _kind(case)

    def outcome(passed: bool, shown: str, detail: str = "") -> _Outcome:
        return _Outcome(case_name, kind, passed, shown, "" if passed else detail)

    if status != 200:
        return outcome(False, f"HTTP {status}", text[:300])
    try:
        choice = json.loads(text)["choices"][0]
        message = choice["message"] if chat else {"content": choice["text"]}
    except (ValueError, KeyError, IndexError, TypeError):
        return outcome(False, text[:120], "the answer is not a completion")
    answer = message.get("content") or ""
    if kind == "tool":
        assert case.tool is not None
        calls = message.get("tool_calls") or []
        if not calls:
            return outcome(False, answer, "no tool call")
        call = calls[0].get("function") or {}
        shown = f"{call.get('name')}({call.get('arguments')})"
        if call.get("name") != case.tool["name"]:
            return outcome(False, shown, f"called {call.get('name')!r}, not "
                                         f"{case.tool['name']!r}")
        try:
            arguments = json.loads(call.get("arguments") or "")
        except ValueError:
            return outcome(False, shown, "its arguments are not JSON")
        why = _invalid(arguments, case.tool.get("parameters", {"type": "object"}))
        return outcome(why is None, shown, f"its arguments: {why}")
    if kind == "exact":
        assert case.exact is not None
        return outcome(answer.strip() == case.exact.strip(), answer, f"not {case.exact!r}")
    if kind == "regex":
        assert case.regex is not None
        return outcome(re.search(case.regex, answer) is not None, answer,
                       f"no match of /{case.regex}/")
    assert case.json_schema is not None
    try:
        doc = json.loads(_unfenced(answer))
    except ValueError:
        return outcome(False, answer, "the answer is not JSON")
    why = _invalid(doc, case.json_schema)
    return outcome(why is None, answer, str(why))


def _unfenced(text: str) -> str:
    """A JSON answer without the Markdown code fence a chat model often puts around it."""
    found = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.S)
    return found[1] if found else text


def _invalid(doc: Any, schema: Mapping[str, Any]) -> str | None:
    """Why `doc` is not valid against the JSON Schema, or None."""
    import jsonschema

    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path))
    return f"{where + ': ' if where else ''}{error.message}"


# -- tokens/s -------------------------------------------------------------------------------------
def _speed(base: str, headers: Mapping[str, str], model: ServedModel
           ) -> tuple[float | None, str]:
    """Tokens/s of the model on this machine, measured: generated ones for a model that
    generates (as the runtime times its generation, else over each request), embedded ones
    for an embedding model; the median of SPEED_RUNS requests."""
    import httpx

    if model.role not in ("chat", "completion", "embedding"):
        return None, f"not measured for a {model.role} model"
    embed = model.role == "embedding"
    endpoint, body = ("/v1/embeddings", {"input": baseline.EMBEDDING_INPUTS}) if embed else (
        "/v1/completions", {"prompt": baseline.COMPLETION_PROMPT, "temperature": 0,
                            "seed": baseline.SEED, "max_tokens": SPEED_TOKENS})
    rates, timed = [], True
    with httpx.Client(timeout=120, trust_env=False) as client:
        for _ in range(SPEED_RUNS):
            t0 = time.perf_counter()
            try:
                r = client.post(base + endpoint, json={"model": model.name, **body},
                                headers=dict(headers))
                doc = r.json()
                tokens = doc["usage"]["prompt_tokens" if embed else "completion_tokens"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                return None, f"not measured: {type(e).__name__}"
            seconds = time.perf_counter() - t0
            runtime = (doc.get("timings") or {}).get("predicted_per_second")
            timed = timed and bool(runtime) and not embed
            rates.append(float(runtime) if runtime and not embed else tokens / seconds)
    how = ("generation as the runtime times it" if timed else
           "embedded tokens over each request's time" if embed else
           "generated tokens over each request's time")
    return round(statistics.median(rates), 1), f"measured: {how}, median of {SPEED_RUNS}"


# -- apply and rollback ---------------------------------------------------------------------------
def _filed(home: Home, name: str, sha256: str) -> dict[str, Any]:
    path = comparison_path(home, name, sha256)
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        raise NotFoundError(f"{name}'s candidate (sha256 {sha256[:12]}) has no comparison on "
                            f"file ({path})",
                            hint=f"compare it first: sovctl upgrade {name} REF") from None
    if doc.get("schema") != COMPARISON_SCHEMA:
        raise NotFoundError(f"{path} is not a comparison this sovctl reads",
                            hint=f"compare again: sovctl upgrade {name} REF")
    return doc


def _verified(home: Home, name: str, pin: LockEntry, what: str) -> None:
    """The pin's blob re-hashed in full: a switch never serves bytes the lock does not pin."""
    r = integrity.check(home, f"{name}/{what}", pin.sha256, pin.size, full=True)
    if not r.ok:
        raise IntegrityError(
            f"refusing to switch {name} to its {what}: its blob is {r.status} (lock sha256 "
            f"{pin.short_sha}" + (f", found {r.actual})" if r.actual else ")"),
            hint=f"pull it again: sovctl upgrade {name} {pin.ref}")


def _switch(home: Home, name: str, pin: LockEntry, from_sha256: str, why: str,
            flags: Mapping[str, Any], progress: Progress) -> Switched:
    """Switch a running stack that serves NAME to the pin, live; nothing when none does."""
    now = utcnow()
    running = control.status(home)
    proc = next((p for p in running.processes
                 if p.kind == ProcessKind.RUNTIME and p.model == name), None)
    if not running.running or proc is None:
        return Switched(name, why, from_sha256, pin.sha256, now, live=False)
    progress(f"switching the running {proc.name} to sha256 {pin.short_sha}: it starts beside "
             "the runtime serving it and takes the traffic once healthy")
    cfg = config.load(home, flags=flags)
    t0 = time.perf_counter()
    outcome = control.switch_model(home, SwitchRequest(
        secrets.token_hex(8), proc.name, pin.sha256, pin.size,
        str(BlobStore(home).path(pin.sha256)), why),
        timeout=cfg.serve.start_timeout + DRAIN_WAIT_S)
    if outcome.phase == "failed":
        raise RuntimeStartError(
            f"{name} was not switched: {outcome.reason}; it is still served by sha256 "
            f"{outcome.from_sha256[:12]}, and the lock is unchanged",
            hint=f"see 'sovctl logs {proc.name}'")
    return Switched(name, why, from_sha256, pin.sha256, now, live=True, process=proc.name,
                    seconds=round(time.perf_counter() - t0, 3),
                    drain_seconds=outcome.drain_seconds, phase=outcome.phase)


def apply(home: Home, name: str, *, flags: Mapping[str, Any], force: bool = False,
          progress: Progress = _quiet) -> Switched:
    """Switch NAME to the candidate compared last: live where a stack serves it, then in the
    lock (the pin it had kept as `previous`); its baseline recorded; the change noted."""
    with Lock.editing(home) as lock:
        entry = lock.get(name)
        candidate = entry.candidate
        if candidate is None:
            raise NotFoundError(f"{name} has no upgrade candidate",
                                hint=f"pull and compare one first: sovctl upgrade {name} REF")
        filed = _filed(home, name, candidate.sha256)
        regressions = filed["comparison"].get("regressions") or []
        if regressions and not force:
            raise CheckFailed(
                f"not applied: the candidate fails {len(regressions)} check(s) that {name} "
                f"passes now: {', '.join(regressions)}",
                hint=f"see the comparison in {comparison_path(home, name, candidate.sha256)}; "
                "--force applies it anyway")
        progress(f"re-hashing {name}'s candidate against the lock")
        _verified(home, name, candidate, "candidate")
        switched = _switch(home, name, candidate, entry.sha256, "upgrade", flags, progress)
        lock.entries[name] = replace(candidate, name=name, verified_at=utcnow(),
                                     previous=entry.pin_only(), candidate=None)
    switched = replace(switched, baseline=str(_record_baseline(home, name, candidate, filed)))
    record_change(home, {"name": name, "why": "upgrade", "from_sha256": switched.from_sha256,
                         "to_sha256": switched.to_sha256, "at": switched.at,
                         "live": switched.live, "text": switched.text})
    return switched


def _record_baseline(home: Home, name: str, pin: LockEntry, filed: Mapping[str, Any]) -> Path:
    """NAME's baseline for its new pin: the candidate's answers to the fixed requests in the
    comparison, served with NAME's settings on the same engine."""
    b = filed["baseline"]
    answers = tuple(replace(baseline.Answer(**a), model=name) for a in b["answers"])
    served = ServedModel(name=name, role=b["role"], sha256=pin.sha256, size=pin.size,
                         blob=str(BlobStore(home).path(pin.sha256)), n_ctx=b["n_ctx"])
    exchange = baseline.Exchange(answers, 200, (name,))
    (path,) = baseline.record(home, [served], exchange, {
        "network": b["network"], "versions": versions(), "n_ctx": {name: b["n_ctx"]},
        "recorded_by": "sovctl upgrade --apply, from the candidate's answers in its comparison",
    }, served_by={name: b["engine"]})
    return path


def rollback(home: Home, name: str, *, flags: Mapping[str, Any],
             progress: Progress = _quiet) -> Switched:
    """Switch NAME back to its previous pin, the same way as an upgrade: the pin it leaves
    becomes `previous` (a second rollback returns to it). No baseline is recorded: the
    previous pin's is still on file."""
    with Lock.editing(home) as lock:
        entry = lock.get(name)
        previous = entry.previous
        if previous is None:
            raise NotFoundError(f"{name} has no previous pin to roll back to",
                                hint=f"a rollback undoes an upgrade applied with 'sovctl "
                                f"upgrade {name} REF --apply'")
        progress(f"re-hashing {name}'s previous pin against the lock")
        _verified(home, name, previous, "previous pin")
        switched = _switch(home, name, previous, entry.sha256, "rollback", flags, progress)
        lock.entries[name] = replace(previous, name=name, previous=entry.pin_only(),
                                     candidate=entry.candidate)
    record_change(home, {"name": name, "why": "rollback", "from_sha256": switched.from_sha256,
                         "to_sha256": switched.to_sha256, "at": switched.at,
                         "live": switched.live, "text": switched.text})
    return switched

