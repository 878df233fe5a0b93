"""The documents that cross process boundaries: the supervisor's state and the gateway's routes.

Each has one typed definition here, with a schema version, and is written and read only
through it: the supervisor writes `state.json` and `serve` writes `routes.json`; the CLI, the
gateway and the audit read them. A document of another version is refused with a clear error
rather than half-understood. The third, `plan.json` (the plan a detached supervisor runs,
written by the CLI that made it), is `sovctl.runtime.plan.Plan`, under the same rule: its
schema version is here.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from sovctl.config import ServeSettings
from sovctl.errors import ConfigError
from sovctl.fsutil import atomic_write
from sovctl.ledger.store import MAX_ROWS
from sovctl.prices import Price

# /3: the [cluster] workers each runtime uses, with their health and memory. /4: the status
# "unloaded", of an on-demand model's runtime not running until a request asks for it. /5: the
# memory budget, and each runtime's memory (estimated and held), load state, last use, load
# counters and why it was last unloaded or waits for memory. /6: `switches`, a model switched to
# other weights while the stack runs (sovctl.runtime.switch).
STATE_SCHEMA = "sovctl.state/6"
# /4: a provider's allowed models with a price each, its concurrency and max_tokens bounds;
# the ledger's row bound; the gateway's image, connection and header-time limits and the Host
# and Origin names it admits. /5: a provider's kind, the API it speaks. /6: a route's model
# loaded on demand; the gateway's load_timeout. /7: the apps' limits ([apps.NAME]) and the
# file of the apps' keys; the home, for the operator's page.
ROUTES_SCHEMA = "sovctl.routes/7"
# /1: the plan a detached supervisor runs (sovctl.runtime.plan.Plan), from the CLI that made it.
# /2: a runtime's load mode and idle unload. /3: the memory budget, each runtime's estimated
# memory and pin; the apps' limits.
PLAN_SCHEMA = "sovctl.plan/3"

# The gateway and the supervisor about on-demand models, in the run folder (see
# sovctl.runtime.demand): LOAD_DIR/NAME asks the supervisor to load NAME; USED_DIR/NAME's mtime
# is when NAME's last request ended, and the gateway holds a shared lock on it while any is in
# flight.
LOAD_DIR = "load"
USED_DIR = "used"
WAKE_FIFO = "wake"  # a named pipe: a byte down it wakes the supervisor for a load request
# A model switched to other weights while the stack runs (see sovctl.runtime.switch):
# SWITCH_DIR/NAME asks the supervisor for it; SERVING_DIR/NAME.PORT exists while the runtime of
# NAME on PORT may be sent requests, and the gateway holds a shared lock on it while any is.
SWITCH_DIR = "switch"
SERVING_DIR = "serving"


class LoadState(StrEnum):
    """A model's runtime as an operator asks of it: is the model in memory, and is it in use."""

    LOADING = "loading"  # started, not yet answering
    LOADED = "loaded"  # up, with requests in flight
    IDLE = "idle"  # up, no request in flight: an unpinned on-demand one may be evicted
    UNLOADED = "unloaded"  # not in memory


# Why a requested load waits (ProcessState.memory_wait_kind): BUSY, the memory is held by
# unpinned on-demand runtimes loading or with requests in flight, which are evicted once those
# end (the request waits, up to load_timeout); HELD, by runtimes nothing may evict (loaded
# always, pinned): the request gets a 503 at once.
MEMORY_BUSY = "busy"
MEMORY_HELD = "held"


@dataclass(frozen=True)
class MemoryBudget:
    """The memory a stack's runtimes may hold together, as sizing estimates each."""

    ram: int  # bytes
    ram_source: str  # "[serve] memory_limit", or what was available less memory_reserve
    vram: int = 0  # free VRAM over the GPUs NVML saw; 0: none
    vram_source: str = "no GPU"


class Status(StrEnum):
    """Where a supervised process is in its life."""

    PENDING = "pending"
    STARTING = "starting"  # spawned, not yet healthy
    UP = "up"  # answered its health check
    BACKOFF = "backoff"  # crashed or hung; waiting to be restarted
    FAILED = "failed"  # crash-looped; given up on until the stack restarts
    STOPPED = "stopped"
    UNLOADED = "unloaded"  # an on-demand model's runtime, not running: a request loads it


def check_schema(doc: Any, expected: str, path: Path) -> dict[str, Any]:
    """`doc`, when it is a document of the `expected` schema; a ConfigError otherwise."""
    if not isinstance(doc, dict) or doc.get("schema") != expected:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise ConfigError(
            f"{path} is not a {expected} document (found schema {found!r})",
            hint="it was written by another sovctl version: 'sovctl stop' stops a stack of "
            "any version; then serve again",
        )
    return doc


def _load(path: Path, expected: str) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}",
                          hint="remove it; the next serve writes it again") from None
    return check_schema(doc, expected, path)


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# -- state.json -----------------------------------------------------------------------------------
class ProcessKind(StrEnum):
    """What a supervised process is: in a plan (ProcessSpec) and in state.json."""

    RUNTIME = "runtime"  # a model's engine (sovctl.engines)
    GATEWAY = "gateway"  # the one OpenAI-compatible front
    TUNNEL = "tunnel"  # the public face: ssh -R to a host the operator owns
    WORKER = "worker"  # an RPC worker (ggml-rpc-server), the only process of `sovctl worker`


class WorkerStatus(StrEnum):
    """Where a [cluster] worker stands with the runtime configured to use it."""

    IN_USE = "in use"  # answered at the runtime's start and holds some of its layers
    LOST = "lost"  # did not answer: the runtime runs without it, and it is asked again


@dataclass(frozen=True)
class WorkerState:
    endpoint: str
    status: WorkerStatus
    free: int  # bytes its devices had free when last asked (before the runtime loaded on it)
    total: int
    holds: int  # bytes the runtime put on it (weights, KV cache, compute), from its log; 0: unknown
    checked_at: float  # wall clock of the last time it was asked
    reason: str  # why it is lost

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**{**_known(cls, d), "status": WorkerStatus(d["status"])})


@dataclass(frozen=True)
class ProcessState:
    name: str
    kind: ProcessKind
    role: str
    model: str
    sha256: str
    runtime: str  # a runtime's engine, by name (sovctl.engines); "" otherwise
    port: int
    pid: int | None
    status: Status
    restarts: int
    up_since: float | None  # wall-clock time of the first healthy check since the last start
    last_exit: str
    workers: tuple[WorkerState, ...] = ()  # a clustered runtime's workers, as configured
    # A tunnel's end-to-end probe, when it cannot run: why (its public host refuses the probe's
    # way in), and what its health rests on instead; "" when it runs, or for any other process.
    probe_skipped: str = ""
    # A runtime's memory: what sizing estimates it holds (admitted against the budget by it),
    # and what it holds now, measured (its resident set, and its processes' VRAM by NVML).
    load: str = "always"  # [models.NAME] load
    pinned: bool = False
    load_state: str = ""  # a LoadState; "" for processes that are not runtimes
    last_used: float | None = None  # wall clock a request for it last ended (or it loaded)
    memory_estimated: int = 0
    vram_estimated: int = 0
    memory_held: int | None = None  # bytes resident; None while not running
    vram_held: int | None = None  # bytes on GPUs; None where NVML sees none
    unload_reason: str = ""  # why it was last unloaded: idle, evicted for another model
    memory_wait: str = ""  # why a requested load waits: what holds the memory
    memory_wait_kind: str = ""  # MEMORY_BUSY or MEMORY_HELD, with memory_wait
    loads: int = 0  # starts that came up (a restart after a crash too)
    load_seconds: float = 0.0  # from each of those starts to healthy, summed
    unloads: int = 0  # idle unloads and evictions
    evictions: int = 0  # unloads to make room for another model

    def uptime(self, now: float | None = None) -> float:
        """Seconds since it first answered healthy; 0 while it is not up."""
        if self.status != Status.UP or self.up_since is None:
            return 0.0
        return max((now or time.time()) - self.up_since, 0.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**{**_known(cls, d), "kind": ProcessKind(d["kind"]),
                      "status": Status(d["status"]),
                      "workers": tuple(WorkerState.from_dict(w) for w in d.get("workers", ()))})


@dataclass(frozen=True)
class SwitchState:
    """A model's switch to other weights while the stack runs, under way or its outcome (the
    last one per model)."""

    id: str  # the request's (sovctl.runtime.switch.SwitchRequest)
    name: str
    why: str  # "upgrade" | "rollback"
    from_sha256: str
    to_sha256: str
    # "starting": the new runtime is starting, the old one serves; "draining": the new one
    # serves, the old one finishes its requests in flight; "done"; "failed" (see reason)
    phase: str
    started_at: float
    finished_at: float | None = None
    reason: str = ""  # why it failed (the old runtime serves on), or why a done one cut requests
    old_pid: int | None = None  # the runtime being replaced, while it runs
    old_port: int = 0
    new_pid: int | None = None  # the runtime replacing it, while it starts
    new_port: int = 0
    drain_seconds: float = 0.0  # from the new runtime serving to the old one's last request

    @property
    def over(self) -> bool:
        return self.phase in ("done", "failed")


@dataclass(frozen=True)
class Event:
    time: float
    process: str
    event: str


@dataclass(frozen=True)
class StackState:
    supervisor_pid: int
    started_at: float
    updated_at: float
    url: str
    host: str
    port: int
    api_key_required: bool
    stopping: bool
    final: bool  # the supervisor's last write, as it exited
    processes: tuple[ProcessState, ...]
    events: tuple[Event, ...]
    memory: MemoryBudget | None = None  # the budget the runtimes are admitted under
    switches: tuple[SwitchState, ...] = ()  # models switched to other weights, the last each

    def process(self, name: str) -> ProcessState | None:
        return next((p for p in self.processes if p.name == name), None)

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps({"schema": STATE_SCHEMA, **asdict(self)},
                                      indent=2).encode())

    @classmethod
    def read(cls, path: Path) -> Self | None:
        d = _load(path, STATE_SCHEMA)
        if d is None:
            return None
        return cls(**{
            **_known(cls, d),
            "processes": tuple(ProcessState.from_dict(p) for p in d["processes"]),
            "events": tuple(Event(**e) for e in d["events"]),
            "memory": MemoryBudget(**d["memory"]) if d.get("memory") else None,
            "switches": tuple(SwitchState(**s) for s in d.get("switches", ())),
        })


# -- routes.json ----------------------------------------------------------------------------------
LOCAL = "local"
PROVIDER = "provider"
# A request reaches a provider only by naming it: "frontier/NAME/MODEL".
FRONTIER_PREFIX = "frontier/"


@dataclass(frozen=True)
class Provider:
    """A frontier API a request may be routed to by exception. The key is never here: the
    gateway reads it from its environment, under the name `api_key_env`."""

    name: str
    api_key_env: str
    daily_cap: float | None  # money a day (UTC) after which its requests get 429
    # The models a request may name ("frontier/NAME/MODEL"), each at its list price: the client
    # picks the model, so only a priced one may be sent, or the cap would count at a wrong price.
    models: dict[str, Price]
    max_concurrent: int  # requests in flight at once; beyond, 429
    max_tokens: int  # the most a request may ask to generate; applied when it asks for none
    # The API it speaks (config.PROVIDER_KINDS): "openai" (Chat Completions, Responses) or
    # "anthropic" (Messages); a request on another surface is refused.
    kind: str = "openai"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**{**_known(cls, d),
                      "models": {k: Price(**v) for k, v in d["models"].items()}})


@dataclass(frozen=True)
class Route:
    model: str  # the served name; for a provider route "frontier/NAME", its requests' prefix
    role: str  # "chat" | "embedding" | "completion"
    kind: str  # LOCAL: a supervised runtime on loopback | PROVIDER: a frontier API, opted into
    process: str  # the supervised process that serves it (its status gates requests); "" none
    upstream: str  # base URL of the runtime, or the provider's (ending in /v1)
    runtime: str  # its engine's name (sovctl.engines); "" for a provider
    parallel: int  # requests the runtime serves at once; the gateway admits that many
    key_file: str | None  # the runtime's internal key, sent upstream; None: it takes none
    # Served with a multimodal projector: it can read images.
    vision: bool = False
    # None: no figure (a local model never benched); a provider's prices are per model, on
    # its Provider
    price: Price | None = None
    provider: Provider | None = None  # set on PROVIDER routes only
    on_demand: bool = False  # its runtime is loaded by a request, and may be unloaded idle

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        price, provider = d.get("price"), d.get("provider")
        return cls(**{**_known(cls, d),
                      "price": Price(**price) if price else None,
                      "provider": Provider.from_dict(provider) if provider else None})


@dataclass(frozen=True)
class AppLimits:
    """An app's limits ([apps.NAME], as config.AppSettings): the gateway holds each request of
    the app to them. None: no limit."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None  # prompt + generated, a UTC day
    max_concurrent: int | None = None
    providers: tuple[str, ...] | None = None  # the providers it may use; None: all
    frontier_daily_cap: float | None = None  # money a UTC day on frontier routes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        providers = d.get("providers")
        return cls(**{**_known(cls, d),
                      "providers": tuple(providers) if providers is not None else None})


_SERVE = ServeSettings()


@dataclass(frozen=True)
class Limits:
    """What the gateway admits, from [serve] (defaults as there)."""

    queue_limit: int
    queue_timeout: float
    max_body_bytes: int
    max_images: int = _SERVE.max_images
    max_image_bytes: int = _SERVE.max_image_bytes
    max_image_pixels: int = _SERVE.max_image_pixels
    max_connections: int = _SERVE.max_connections
    header_timeout: float = _SERVE.header_timeout
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    load_timeout: float = _SERVE.load_timeout  # for an on-demand model's runtime to load

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**{**_known(cls, d),
                      "allowed_hosts": tuple(d.get("allowed_hosts", ())),
                      "allowed_origins": tuple(d.get("allowed_origins", ()))})


@dataclass(frozen=True)
class RoutesTable:
    host: str
    port: int
    auth_required: bool
    key_file: str  # the gateway's API key, read when auth_required
    limits: Limits
    state_file: str
    routes: tuple[Route, ...]
    ledger: str = ""  # the SQLite file every request is recorded in; "" records nothing
    ledger_max_rows: int = MAX_ROWS  # [ledger] max_rows: beyond, the oldest fold into daily totals
    # The apps' keys, hashed (sovctl keys; read again whenever it changes); "": no app keys.
    app_keys_file: str = ""
    apps: tuple[AppLimits, ...] = ()  # [apps.NAME]: each app's limits
    # The operator's home: the page at /ui reads its [cost] settings, bench history and audit
    # reports there (sovctl.gateway.ui); "": the page shows none of those.
    home: str = ""

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps({"schema": ROUTES_SCHEMA, **asdict(self)},
                                      indent=2).encode())

    @classmethod
    def read(cls, path: Path) -> Self:
        d = _load(path, ROUTES_SCHEMA)
        if d is None:
            raise ConfigError(f"no routing table at {path}",
                              hint="the gateway is started by 'sovctl serve'")
        return cls(**{
            **_known(cls, d),
            "limits": Limits.from_dict(d["limits"]),
            "routes": tuple(Route.from_dict(r) for r in d["routes"]),
            "apps": tuple(AppLimits.from_dict(a) for a in d["apps"]),
        })
