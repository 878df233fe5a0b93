"""The one start sequence: every command that starts a stack (`serve`, `up`, the audit,
`tunnel`, `worker`) admits its plan here, in one order: the weights, then every other refusal
(a stack running, a port taken, an unpinned host key), and only then the API key, so a refused
start leaves no secret behind. Then `start` runs it under a detached supervisor, or the caller
runs it in the foreground (`sovctl.runtime.control.run_foreground`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovctl.apikey import ensure_api_key
from sovctl.errors import ConfigError, IntegrityError
from sovctl.home import Home
from sovctl.runtime import control
from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.plan import Plan, write_routes, write_runtime_keys
from sovctl.runtime.ports import ensure_free
from sovctl.runtime.supervisor import already_running, instance_running
from sovctl.runtime.tunnel import pinned_keys
from sovctl.store.integrity import BlobCheck, check


def check_weights(home: Home, plan: Plan, full: bool) -> list[BlobCheck]:
    """Every served blob (a model's weights and its projector) against the lock; refuse to
    start on the first that fails. A projector's check is named MODEL/mmproj."""
    blobs = [(m.name, "", m.sha256, m.size) for m in plan.models]
    blobs += [(m.name, "/mmproj", m.mmproj_sha256, m.mmproj_size) for m in plan.models
              if m.mmproj]
    results = [(name, check(home, name + part, sha, size, full=full))
               for name, part, sha, size in blobs]
    for name, r in results:
        if not r.ok:
            what = "projector blob" if r.name != name else "blob"
            raise IntegrityError(
                f"refusing to serve {name!r}: its {what} is {r.status} "
                f"(lock sha256 {r.sha256[:12]}" + (f", found {r.actual})" if r.actual else ")"),
                hint=f"run 'sovctl verify {name}', then 'sovctl rm {name}' and pull it again",
            )
    return [r for _, r in results]


def prepare(home: Home, plan: Plan) -> None:
    """Refuse to start (a stack running, a port taken, an unpinned host key) or make the run
    directory ready."""
    home.ensure(home.run, home.logs)
    if instance_running(home.run):
        raise already_running()
    if plan.tunnel is not None and not pinned_keys(plan.tunnel):
        raise ConfigError(f"the tunnel's host {plan.tunnel.host_key_name} has no pinned host key",
                          hint="pin it once with 'sovctl tunnel --pin-only', which shows its "
                          "fingerprint to confirm")
    what = {ProcessKind.GATEWAY: "the gateway", ProcessKind.TUNNEL: "the tunnel's health probe",
            ProcessKind.WORKER: "the RPC worker"}
    for p in plan.processes:
        host = plan.host if p.kind in (ProcessKind.GATEWAY, ProcessKind.WORKER) else "127.0.0.1"
        ensure_free(host, p.port, what.get(p.kind, f"runtime {p.name}"))
    # The saved plan is a detached supervisor's alone: a foreground stack leaves none, which is
    # how `sovctl tunnel` knows it cannot restart it.
    for stale in (plan.state_file, plan.egress_log, str(home.run / "plan.json")):
        Path(stale).unlink(missing_ok=True)
    write_runtime_keys(plan)
    write_routes(plan, home)


@dataclass(frozen=True)
class Admitted:
    """What a start was let through with: each served blob's check, and the API key where the
    gateway requires one (`api_key_created`: made just now, so it is shown once)."""

    weights: tuple[BlobCheck, ...]
    api_key: str | None
    api_key_created: bool
    api_key_file: Path | None


def admit(home: Home, plan: Plan, *, full_verify: bool = False) -> Admitted:
    """The one start sequence up to the launch, in its one order: the weights, then every other
    refusal (prepare), and only then the API key, so a refused start leaves no secret behind.
    `serve`, `up`, the audit, `tunnel` and `worker` all start through here."""
    weights = tuple(check_weights(home, plan, full=full_verify))
    prepare(home, plan)
    if not plan.api_key_required:
        return Admitted(weights, None, False, None)
    key, created = ensure_api_key(home)
    return Admitted(weights, key, created, home.secrets / "api_key")


def start(home: Home, plan: Plan, *, full_verify: bool = False
          ) -> tuple[Admitted, control.StackStatus]:
    """Admit the plan, then start it detached."""
    admitted = admit(home, plan, full_verify=full_verify)
    return admitted, control.start_detached(home, plan)
