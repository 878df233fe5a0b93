"""The audit's orchestration, as the CLI calls it: `blackout()` and `record_baseline()`.

blackout:
 1. make sure a network namespace can be created (else IsolationError, exit 8; no fallback);
 2. check 2, the weights: a full re-hash of every served blob against sovctl.lock;
 3. where a served model has no baseline at all, or one recorded with another runtime, record
    one first, outside the namespace with the network available (never from weights that
    failed check 2);
 4. run `python -m sovctl.audit.inside` in a fresh network namespace: it starts the stack,
    runs checks 1 and 3-7, stops the stack and hands its findings back in a file;
 5. write the report under HOME/reports, with the stack's bill of materials beside it, and
    return it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl import config
from sovctl.audit import baseline, bridge, checks, stack
from sovctl.audit.report import (
    AuditReport,
    ModelInfo,
    changes_since,
    host_fingerprint,
    versions,
    write,
)
from sovctl.errors import IsolationError, RuntimeStartError
from sovctl.home import Home
from sovctl.netns import current_netns, preflight
from sovctl.provenance.bom import bom_document
from sovctl.result import utcnow
from sovctl.runtime.plan import build

Progress = Callable[[str], None]

INSIDE_TIMEOUT = 1800.0


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class BaselineResult:
    models: tuple[ModelInfo, ...]
    files: tuple[str, ...]
    answers: tuple[Mapping[str, Any], ...]
    seconds: float
    network: str  # the namespace it was recorded in: the host's, with the network available


def record_baseline(home: Home, flags: Mapping[str, Any], chat: Sequence[str],
                    embedding: Sequence[str], only: Sequence[str] | None = None,
                    full_verify: bool = True, progress: Progress = _quiet,
                    rerank: Sequence[str] = ()) -> BaselineResult:
    """Start the stack normally (network available), send the fixed requests, record answers.

    `only` limits which models get a baseline written (all models always get the requests, so
    each runtime sees the same sequence as in the blackout)."""
    t0 = time.perf_counter()
    cfg = config.load(home, flags=flags)
    run_home = stack.audit_home(home, "baseline")
    for attempt in (1, 2):
        stack.fresh_run_dir(run_home)
        _, plan = stack.plans(home, run_home, cfg, chat, embedding, rerank=rerank)
        progress(f"starting {', '.join(m.name for m in plan.models)} for the baseline")
        try:
            stack.start(run_home, plan, full_verify=full_verify and attempt == 1)
            break
        except RuntimeStartError:
            # Outside a namespace the ports are shared with the whole machine: another
            # program may take a port between planning and binding. One retry, new ports.
            if attempt == 2:
                raise
            progress("the stack did not start; retrying once on new ports")
    try:
        base, headers = stack.client_base(plan), stack.auth_headers(home, plan)
        ready = stack.wait_ready(base, headers)
        if not ready.ok:
            raise RuntimeStartError(f"no baseline recorded: the stack's /ready did not answer "
                                    f"200 (last: {ready.last})",
                                    hint=f"see the logs under {run_home.logs}")
        exchange = baseline.exercise(base, plan.models, headers)
    finally:
        stack.stop(run_home)
    bad = [a for a in exchange.answers if not a.ok]
    if bad:
        raise RuntimeStartError(
            "no baseline recorded: " + "; ".join(
                f"{a.model} {a.request} failed (status {a.status} {a.error})" for a in bad),
            hint=f"see the logs under {run_home.logs}")
    chosen = [m for m in plan.models if only is None or m.name in only]
    netns = current_netns()
    files = baseline.record(home, chosen, exchange, {
        "network": f"host namespace {netns}", "versions": versions(),
        "n_ctx": {m.name: m.n_ctx for m in chosen},
    }, served_by=baseline.engines(plan))
    return BaselineResult(
        models=tuple(ModelInfo(m.name, m.role, m.sha256, m.size) for m in chosen),
        files=tuple(map(str, files)),
        answers=tuple({"model": a.model, "request": a.request, "seconds": round(a.seconds, 3),
                       "text": a.text, "dims": len(a.vectors[0]) if a.vectors else None,
                       "scores": a.scores}
                      for a in exchange.answers if only is None or a.model in only),
        seconds=round(time.perf_counter() - t0, 3),
        network=f"host namespace {netns}",
    )


def _run_inside(home: Home, job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    job_file = run_dir / "job.json"
    result_file = run_dir / "inside-result.json"
    job["result"] = str(result_file)
    job_file.write_text(json.dumps(job, indent=2))
    log = run_dir / "inside.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sovctl.audit.inside", str(job_file)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=INSIDE_TIMEOUT)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            # Whatever happened inside, no audit stack outlives the audit.
            stack.stop(stack.audit_home(home, "blackout"))
    try:
        doc: dict[str, Any] = json.loads(result_file.read_text())
    except (OSError, ValueError):
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise RuntimeStartError(
            f"the audit's in-namespace process exited with code {rc} and no findings"
            + (f": {tail[0]}" if tail else ""), hint=f"see {log}") from None
    if "isolation_error" in doc:
        e = doc["isolation_error"]
        raise IsolationError(e["message"], hint=e.get("hint"))
    return doc


def _baseline_note(recorded_now: Sequence[str], replaced: Mapping[str, str]) -> str:
    if not recorded_now:
        return ""
    new = [n for n in recorded_now if n not in replaced]
    why = ([f"no baseline existed for {', '.join(new)}"] if new else []) + [
        f"{n}'s baseline was recorded with {w}, another runtime, so it was not compared"
        for n, w in replaced.items()]
    return (f"{'; '.join(why)}: a baseline was recorded first for {', '.join(recorded_now)}, "
            "outside the namespace, with the network available")


def blackout(home: Home, flags: Mapping[str, Any], chat: Sequence[str],
             embedding: Sequence[str], egress_probe: str | None = None,
             progress: Progress = _quiet, rerank: Sequence[str] = ()) -> AuditReport:
    t_start = time.perf_counter()
    started_at, when = utcnow(), dt.datetime.now(dt.UTC)
    timings: dict[str, float] = {}

    # 1. Isolation must be possible before anything else is done.
    t = time.perf_counter()
    mode = preflight()
    outer_netns = current_netns()
    timings["preflight"] = round(time.perf_counter() - t, 3)

    cfg = config.load(home, flags=flags)
    configured = build(home, cfg, chat, embedding, rerank=rerank)
    models = configured.models

    # 2. Weights, re-hashed in full, before any of them is loaded.
    progress(f"re-hashing {', '.join(m.name for m in models)} against sovctl.lock")
    c2 = checks.weights(home, models)
    timings["weights"] = c2.seconds

    # 3. A baseline for models that never had one, or had one from another runtime (whose
    #    answers differ legitimately), recorded with the network available.
    recorded_now: list[str] = []
    replaced: dict[str, str] = {}
    baseline_files: list[str] = []
    if c2.passed:
        served_by = baseline.engines(configured)
        for m in models:
            was = baseline.other_runtime(baseline.find(home, m), served_by[m.name])
            if was is not None:
                replaced[m.name] = was
        todo = [m.name for m in models
                if m.name in replaced or not baseline.has_any(home, m.name)]
        if todo:
            why = "; ".join([f"{n}'s was recorded with {w}" for n, w in replaced.items()]
                            + [f"none for {n}" for n in todo if n not in replaced])
            progress(f"recording a baseline first, with the network available ({why})")
            t = time.perf_counter()
            rec = record_baseline(home, flags, chat, embedding, only=todo,
                                  full_verify=False, progress=progress, rerank=rerank)
            timings["baseline"] = round(time.perf_counter() - t, 3)
            recorded_now, baseline_files = [m.name for m in rec.models], list(rec.files)

    # 4. The blackout itself; a fleet's workers are reached through the audit's own relay.
    run_home = stack.audit_home(home, "blackout")
    stack.fresh_run_dir(run_home)
    workers = next((p.workers for p in configured.processes if p.workers), ())
    progress(f"entering a fresh network namespace ({mode})"
             + (" to start the stack" if c2.passed else "")
             + (f", bridged to the workers {', '.join(workers)}" if workers else ""))
    t = time.perf_counter()
    relay_dir = Path(tempfile.mkdtemp(prefix="sovctl-bridge-"))  # short: a Unix socket's path
    try:
        bridges = bridge.plan_bridges(workers, relay_dir)
        job_flags = {**flags, **({"cluster.workers": [b.literal for b in bridges]} if bridges
                                 else {})}
        with bridge.Outer(bridges) as relay:
            inside = _run_inside(home, {
                "home": str(home.root), "flags": job_flags, "chat": list(chat),
                "embedding": list(embedding), "rerank": list(rerank),
                "egress_probe": egress_probe,
                "outer_netns": outer_netns, "weights_ok": c2.passed,
                "recorded_now": recorded_now, "replaced": replaced,
                "bridges": [dataclasses.asdict(b) for b in bridges],
            }, run_home.run_root)
    finally:
        shutil.rmtree(relay_dir, ignore_errors=True)
    timings["blackout"] = round(time.perf_counter() - t, 3)
    timings.update({f"blackout_{k}": v for k, v in inside.get("timings", {}).items()})

    found = sorted([c2, *(checks.CheckResult.from_dict(c) for c in inside["checks"])],
                   key=lambda c: c.id)
    # 5. What the audited stack is made of: its bill of materials, filed with the report.
    t = time.perf_counter()
    bom = bom_document(home, cfg)
    timings["bom"] = round(time.perf_counter() - t, 3)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    report = AuditReport(
        kind="blackout",
        started_at=started_at,
        finished_at=utcnow(),
        passed=len(found) == len(checks.NAMES) and all(c.passed for c in found),
        isolation={"mode": inside.get("mode", mode), "netns": inside.get("netns"),
                   "outer_netns": outer_netns, "loopback_only": True, "weaker_mode": False,
                   **({"bridged": relay.report()} if bridges else {})},
        models=tuple(ModelInfo(m.name, m.role, m.sha256, m.size) for m in models),
        checks=tuple(found),
        baseline={
            "recorded_now": recorded_now,
            "replaced": replaced,
            "files": baseline_files or [str(baseline.find(home, m).path or "") for m in models],
            "note": _baseline_note(recorded_now, replaced),
        },
        timings=timings,
        host=host_fingerprint(),
        versions=versions(),
        extra={"log_dir": str(run_home.logs), "egress_probe": egress_probe}
        if egress_probe else {"log_dir": str(run_home.logs)},
        # The models switched to other weights since the last blackout report (sovctl upgrade).
        changes=changes_since(home, "blackout"),
    )
    return write(home, report, when, bom)
