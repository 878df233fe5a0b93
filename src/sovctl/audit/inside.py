"""The part of the blackout that runs inside the network namespace.

`python -m sovctl.audit.inside JOB.json` enters a fresh network namespace first thing (while
the process is still single-threaded), brings loopback up, proves the system call tracer works
there, then starts the stack the way `serve --detach` does (every process under the tracer),
runs checks 1 and 3 to 8 against it, stops it, and writes its findings to the result file named
in the job. Every process it starts inherits the namespace.

Exit codes: 0 findings written (passing or not), 8 the namespace was refused (the refusal is in
the result file), anything else a crash (see the log the outer process keeps).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sovctl.errors import ExitCode, IsolationError
from sovctl.netns import current_netns, enter


def _write(path: Path, doc: dict[str, Any]) -> None:
    from sovctl.fsutil import atomic_write  # after enter(), as run()'s imports

    atomic_write(path, json.dumps(doc, indent=2).encode())


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the stack


def run(job: dict[str, Any], mode: str) -> dict[str, Any]:
    # Imported here, not at the top: main() enters the namespace first thing, while this
    # process is single-threaded and has loaded next to nothing (see the module docstring).
    from sovctl import config
    from sovctl.audit import baseline, bridge, checks, stack, tracing
    from sovctl.errors import SovctlError
    from sovctl.home import Home
    from sovctl.runtime import control

    home = Home(Path(job["home"]))
    run_home = stack.audit_home(home, "blackout")
    cfg = config.load(home, flags=job.get("flags") or {})
    configured, plan = stack.plans(home, run_home, cfg, job["chat"], job["embedding"],
                                   egress_probe=job.get("egress_probe"),
                                   rerank=job.get("rerank") or [])
    bridges = [bridge.Bridge(**b) for b in job.get("bridges", ())]
    bridge_error = None
    try:
        relays = bridge.open_inner(bridges)
    except OSError as e:
        relays, bridge_error = [], str(e)
    results = [checks.isolation(mode, job["outer_netns"], bridges, bridge_error)]
    live_env: dict[str, dict[str, str] | None] | None = None
    observed: dict[str, tracing.Observed | None] = {}
    timings: dict[str, float] = {}
    if not job["weights_ok"]:
        why = "the weights failed check 2, and serve refuses to start such a stack"
        results += [checks.not_run(3, why), checks.not_run(4, why), checks.not_run(5, why),
                    checks.not_run(6, why), checks.not_run(8, why)]
    else:
        # The tracer is proven before the stack starts, and the stack runs under it only then;
        # without it, check 6 says which processes went unwatched.
        t0 = time.perf_counter()
        trace_dir = run_home.run / "trace"
        tracer = tracing.prepare(trace_dir, job["outer_netns"])
        if tracer.usable:
            plan = stack.traced(plan, trace_dir)
        timings["tracer"] = round(time.perf_counter() - t0, 3)
        base = stack.client_base(plan)
        headers = stack.auth_headers(home, plan)
        # The gateway refuses a provider whose key is unset before it tries to connect: a
        # stand-in key lets check 8 see the connect itself fail. Nothing leaves the namespace.
        placeholders = [r.provider.api_key_env for r in plan.frontier
                        if r.provider is not None and not os.environ.get(r.provider.api_key_env)]
        for var in placeholders:
            os.environ[var] = "sovctl-audit-placeholder"
        t0 = time.perf_counter()
        start_error: str | None = None
        try:
            stack.start(run_home, plan)
        except SovctlError as e:
            start_error = e.message + (f" ({e.hint})" if e.hint else "")
        started_in = time.perf_counter() - t0
        timings["start"] = round(started_in, 3)
        try:
            results.append(checks.stack_starts(base, headers, started_in, start_error,
                                               lambda: control.status(run_home).processes))
            if start_error is None:
                def watch(name: str) -> None:
                    # A runtime loaded on demand is seen while its requests have it loaded: by
                    # the end, another may have taken its memory.
                    pid = next((p.pid for p in control.status(run_home).processes
                                if p.name == name), None)
                    observed[name] = tracing.observe(pid) if pid else None

                exchange = baseline.exercise(base, plan.models, headers, after=watch)
                timings["requests"] = round(exchange.seconds, 3)
                results.append(checks.service(plan.models, exchange))
                results.append(checks.behaviour(home, plan.models, exchange,
                                                job.get("recorded_now") or [],
                                                job.get("replaced") or {},
                                                baseline.engines(plan)))
                results.append(checks.exception_routes(
                    plan, checks.probe_routes(base, headers, plan), placeholders))
                st = control.status(run_home)
                observed |= {p.name: tracing.observe(p.pid) if p.pid else None
                             for p in st.processes if p.pid or p.name not in observed}
                live_env = {n: o.env if o else None for n, o in observed.items()}
            else:
                why = "the stack did not start"
                results += [checks.not_run(4, why), checks.not_run(5, why),
                            checks.not_run(8, why)]
        finally:
            t1 = time.perf_counter()
            stack.stop(run_home)
            timings["stop"] = round(time.perf_counter() - t1, 3)
        if start_error is None:
            results.append(checks.no_egress(plan, observed, tracer))
        else:
            attempts = len(checks.recorded_attempts(plan))
            results.append(checks.not_run(6, f"the stack did not start ({attempts} egress "
                                             "attempt(s) recorded meanwhile)"))
    results.append(checks.configuration(home, configured, plan, live_env))
    for r in relays:
        r.close()
    return {
        "mode": mode,
        "netns": current_netns(),
        "url": plan.url,
        "checks": [asdict(c) for c in results],
        "timings": timings,
    }


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    out = Path(job["result"])
    try:
        mode = enter()
    except IsolationError as e:
        _write(out, {"isolation_error": {"message": e.message, "hint": e.hint}})
        return int(ExitCode.ISOLATION)
    signal.signal(signal.SIGTERM, _terminate)
    _write(out, run(job, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
