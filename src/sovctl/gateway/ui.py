"""The operator's page: `GET /ui/` with its assets, and the figures it shows, `GET /ui/data.json`.

Everything the page needs ships in the package (`page/`: index.html, app.js, style.css; the
charts are SVG that app.js draws): it loads nothing from any other origin, so it works in the
blackout, and its Content-Security-Policy tells the browser to load nothing else. It asks for
its data every few seconds.

Access. The page and its assets hold no figure: they are served to whoever passes the
gateway's Host and Origin guard, as every path is. The data is served as the API is: on a
loopback gateway without a key; behind the key (beyond loopback, or with a tunnel) only with
`Authorization: Bearer KEY`. A browser sends no such header when it opens a page, so the page
asks for the key when the data answers 401, keeps it in the tab's sessionStorage and sends it
with each request for the data; it never goes into a URL, where history and logs would keep it.

The figures: the processes and workers with their health (the supervisor's state file);
requests, tokens/s and the queue per model (the gateway's own counters); from the ledger, read
through `sovctl.ledger.dashboard.Tally`, the local share of tokens by day (`sovctl ledger`'s
report), today's spend per provider against its cap, each app's tokens and cost here and on
the meter (`sovctl cost --app`), and the curve of owning against the meter (`sovctl cost`);
the last audit's report. Each says whether it is measured, estimated or defaulted, as the
ledger does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route as HttpRoute

from sovctl import config
from sovctl.apikey import DEFAULT_APP
from sovctl.errors import SovctlError
from sovctl.gateway.apps import Apps
from sovctl.gateway.frontier import Frontier
from sovctl.gateway.metrics import Metrics
from sovctl.home import Home
from sovctl.ledger import cost, dashboard, report
from sovctl.ledger.cost import AppCost
from sovctl.ledger.dashboard import Curve, DayShare, Tally
from sovctl.ledger.figures import Amount
from sovctl.result import jsonable, utcnow
from sovctl.runtime.documents import FRONTIER_PREFIX, ProcessState, StackState

PAGE_SCHEMA = "sovctl.ui/1"
DATA_PATH = "/ui/data.json"
ASSETS = {"index.html": "text/html; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# Nothing but the page's own scripts, styles and data; no frame may hold it, no form post it.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "x-frame-options": "DENY"}
RATE_WINDOW_S = 60.0  # tokens/s is counted over about the last minute
MAX_APPS = 20  # the busiest apps the page lists; `sovctl ledger --by app` has them all
# The audit's reports, as sovctl.audit.report writes them: the gateway sits below the audit and
# reads the file, not the module, and only what each version of it holds (kind, finished_at,
# passed, each check's id, name and result).
AUDIT_SCHEMA = "sovctl.audit.report/"


class Served(Protocol):
    """A model the gateway serves, as its route's admission control sees it."""

    model: str
    role: str
    process: str
    runtime: str
    slots: int
    waiting: int


@dataclass(frozen=True)
class Stack:
    url: str
    api_key_required: bool
    supervisor_pid: int
    started_at: float
    stopping: bool


@dataclass(frozen=True)
class Worker:
    endpoint: str
    status: str
    free: int
    total: int
    holds: int
    reason: str


@dataclass(frozen=True)
class Process:
    name: str
    kind: str
    role: str
    model: str
    runtime: str
    port: int
    pid: int | None
    status: str
    restarts: int
    uptime_s: float
    last_exit: str
    workers: tuple[Worker, ...]


@dataclass(frozen=True)
class Model:
    """A model's traffic since the gateway started (a provider's under frontier/NAME)."""

    model: str
    role: str
    status: str
    slots: int | None  # requests served at once; None for a provider
    waiting: int  # requests queued for a slot now
    requests: int
    errors: int  # answered with a status of 400 or more
    tokens_in: int
    tokens_out: int
    tokens_per_s: float | None  # generated, over the last RATE_WINDOW_S; None: not yet known


@dataclass(frozen=True)
class Share:
    target: float  # the seed's 95/5: dashboard.LOCAL_TARGET
    days: tuple[DayShare, ...]  # the window's, oldest first
    overall: Amount  # of the window


@dataclass(frozen=True)
class Provider:
    name: str
    spent: Amount  # today (UTC), as the ledger has it
    cap: float | None  # daily_cap; None: none
    reserved: float  # the worst cases of the requests in flight, held against the cap
    in_flight: int
    max_concurrent: int | None


@dataclass(frozen=True)
class Check:
    id: int
    name: str
    passed: bool


@dataclass(frozen=True)
class Audit:
    kind: str
    file: str  # its name under HOME/reports
    finished_at: str
    passed: bool
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Ledgered:
    """The figures read from the home: the ledger, the settings, the bench, the reports."""

    currency: str
    window_days: int
    share: Share | None
    providers: tuple[Provider, ...]
    apps: tuple[AppCost, ...]
    curve: Curve | None
    audit: Audit | None
    notes: tuple[str, ...]  # what could not be read, and why


@dataclass(frozen=True)
class PageData:
    schema: str
    generated_at: str
    stack: Stack | None
    processes: tuple[Process, ...]
    models: tuple[Model, ...]
    currency: str
    window_days: int
    share: Share | None
    providers: tuple[Provider, ...]
    apps: tuple[AppCost, ...]
    curve: Curve | None
    audit: Audit | None
    notes: tuple[str, ...]
    elapsed_ms: float  # what assembling it took


class Rates:
    """Generated tokens a second per model, from the gateway's counters as the page asks:
    the counters are not touched on the request path."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, dict[str, int]]] = deque()

    def sample(self, now: float, totals: dict[str, int]) -> dict[str, float]:
        while self._seen and now - self._seen[0][0] > RATE_WINDOW_S:
            self._seen.popleft()
        rates = {}
        if self._seen and now - self._seen[0][0] >= 1:
            then, before = self._seen[0]
            rates = {m: (n - before.get(m, 0)) / (now - then) for m, n in totals.items()}
        self._seen.append((now, totals))
        return rates


class Page:
    def __init__(self, state_file: str, ledger: str, home: str, metrics: Metrics,
                 frontier: Frontier, served: Callable[[], Iterable[Served]]) -> None:
        self.state_file = Path(state_file)
        self.home = Home(Path(home)) if home else None
        self.tally = Tally(Path(ledger)) if ledger else None
        self.metrics = metrics
        self.frontier = frontier
        self.served = served
        self.rates = Rates()
        page = resources.files("sovctl.gateway") / "page"
        self.assets = {name: (page / name).read_bytes() for name in ASSETS}
        self._settings: tuple[Any, config.Settings] | None = None

    # -- the HTTP side ---------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return self._asset("index.html")

    async def asset(self, request: Request) -> Response:
        return self._asset(request.url.path.removeprefix("/ui/"))

    def _asset(self, name: str) -> Response:
        return Response(self.assets[name], media_type=ASSETS[name],
                        headers={**HEADERS, "cache-control": "no-cache"})

    async def data(self) -> Response:
        started = time.perf_counter()
        now = time.time()
        stack, processes = self._processes(now)
        models = self._models(time.monotonic(), processes)
        # The ledger and the files of the home are read off the event loop: requests go on.
        found = await asyncio.to_thread(self.ledgered, now)
        doc = PageData(
            schema=PAGE_SCHEMA, generated_at=utcnow(), stack=stack, processes=processes,
            models=models, currency=found.currency, window_days=found.window_days,
            share=found.share, providers=found.providers, apps=found.apps,
            curve=found.curve, audit=found.audit, notes=found.notes,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 2))
        return JSONResponse(jsonable(doc), headers={**HEADERS, "cache-control": "no-store"})

    # -- what the gateway knows --------------------------------------------------------------------
    def _processes(self, now: float) -> tuple[Stack | None, tuple[Process, ...]]:
        try:
            state = StackState.read(self.state_file)
        except SovctlError:
            state = None
        if state is None:
            return None, ()
        return (Stack(state.url, state.api_key_required, state.supervisor_pid,
                      state.started_at, state.stopping),
                tuple(_process(p, now) for p in state.processes))

    def _models(self, now: float, processes: tuple[Process, ...]) -> tuple[Model, ...]:
        m = self.metrics
        requests: dict[str, int] = {}
        errors: dict[str, int] = {}
        for (name, _, code), n in list(m.requests.items()):
            requests[name] = requests.get(name, 0) + n
            if int(code) >= 400:
                errors[name] = errors.get(name, 0) + n
        tokens = dict(m.tokens)
        generated = {name: n for (name, direction), n in tokens.items() if direction == "out"}
        rates = self.rates.sample(now, generated)
        status = {p.name: p.status for p in processes}

        def model(name: str, role: str, state: str, slots: int | None, waiting: int) -> Model:
            return Model(name, role, state, slots, waiting, requests.get(name, 0),
                         errors.get(name, 0), tokens.get((name, "in"), 0),
                         tokens.get((name, "out"), 0), rates.get(name))

        out = [model(r.model, r.role, status.get(r.process, "unknown"), r.slots, r.waiting)
               for r in self.served()]
        out += [model(FRONTIER_PREFIX + p.name, "provider", "routed", None, 0)
                for p in self.frontier.providers.values()]
        return tuple(out)

    # -- what the home holds -------------------------------------------------------------------
    def ledgered(self, now: float) -> Ledgered:
        """The figures of the ledger, the settings, the bench history and the reports."""
        if self.home is None:
            return Ledgered("", cost.WINDOW_DAYS, None, self._providers({}), (), None, None,
                            ("no home in the routing table: the ledger's figures are not shown",))
        notes: list[str] = []
        try:
            settings = self.settings()
        except SovctlError as e:
            return Ledgered("", cost.WINDOW_DAYS, None, self._providers({}), (), None,
                            self.audit(), (f"settings: {e.message}",))
        share: Share | None = None
        spend: dict[str, Amount] = {}
        apps: tuple[AppCost, ...] = ()
        drawn: Curve | None = None
        if self.tally is not None:
            first = dashboard.window_start(now).isoformat()
            today = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
            try:
                snapshot = self.tally.snapshot(now)
                summed = snapshot.by_route().groups
                window = report.report(self.home, settings, since=first, by="route", now=now,
                                       groups=summed)
                share = Share(dashboard.LOCAL_TARGET, dashboard.share_by_day(window.days),
                              window.local_share)
                spend = report.report(self.home, settings, since=today, by="route", now=now,
                                      groups=summed).spend
                used = snapshot.apps()
                busiest = sorted(used, key=lambda a: (-used[a], a))[:MAX_APPS]
                of_apps = snapshot.without_models().groups
                apps = tuple(cost.app_cost(self.home, settings, name, now, of_apps)
                             for name in busiest)
                more = len(used) - len(busiest)
                if more > 0:
                    notes.append(f"{more} more apps: 'sovctl ledger --by app' lists them all")
                drawn = dashboard.curve(cost.answer(self.home, settings, {}, now, summed))
            except SovctlError as e:
                notes.append(f"ledger: {e.message}")
            except sqlite3.Error as e:  # a ledger being replaced under it, say: next poll
                notes.append(f"ledger: {e}")
        return Ledgered(settings.cost.currency, cost.WINDOW_DAYS, share, self._providers(spend),
                        apps, drawn, self.audit(), tuple(notes))

    def settings(self) -> config.Settings:
        """The home's settings, read again when sovctl.toml changes. The gateway's environment
        holds no SOVCTL_* variable (a child inherits only what it needs), so the page's figures
        follow sovctl.toml and its profile."""
        assert self.home is not None
        try:
            st = self.home.config_path.stat()
            stamp: Any = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._settings is None or self._settings[0] != stamp:
            self._settings = (stamp, config.load(self.home))
        return self._settings[1]

    def _providers(self, spend: dict[str, Amount]) -> tuple[Provider, ...]:
        out = [Provider(name, spend.get(name, Amount(0.0, "measured")), p.cap, p.reserved,
                        p.in_flight, p.max_concurrent)
               for name, p in sorted(self.frontier.providers.items())]
        # A provider no longer configured still spent what the ledger says.
        out += [Provider(name, amount, None, 0.0, 0, None)
                for name, amount in sorted(spend.items())
                if name not in self.frontier.providers]
        return tuple(out)

    def audit(self) -> Audit | None:
        """The newest audit report under HOME/reports; None when there is none."""
        assert self.home is not None
        try:
            found = sorted(self.home.reports.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return None
        for path in reversed(found):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                doc = json.loads(path.read_text())
                if not str(doc.get("schema")).startswith(AUDIT_SCHEMA):
                    continue
                return Audit(str(doc["kind"]), path.name, str(doc["finished_at"]),
                             bool(doc["passed"]),
                             tuple(Check(int(c["id"]), str(c["name"]), bool(c["passed"]))
                                   for c in doc["checks"]))
        return None


def _process(p: ProcessState, now: float) -> Process:
    return Process(p.name, str(p.kind), p.role, p.model, p.runtime, p.port, p.pid,
                   str(p.status), p.restarts, round(p.uptime(now), 1), p.last_exit,
                   tuple(Worker(w.endpoint, str(w.status), w.free, w.total, w.holds, w.reason)
                         for w in p.workers))


def operator(apps: Apps, request: Request) -> bool:
    """Whether a request may read the page's data: where the gateway requires a key, only
    with its own (the operator's). An app's key does not open it: the data shows every app's
    traffic, and the processes of the box."""
    if not apps.required:
        return True
    scheme, _, key = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
    return scheme.lower() == b"bearer" and apps.keys.app_of(key) == DEFAULT_APP


def routes(page: Page, apps: Apps, unauthorised: Callable[[], Response]) -> list[HttpRoute]:
    """The page's routes: the page and its assets for whoever passes the guard, the data
    with the gateway's own key where it requires one."""

    async def data(request: Request) -> Response:
        if not operator(apps, request):
            refusal = unauthorised()
            refusal.headers.update(HEADERS)
            return refusal
        return await page.data()

    async def to_page(request: Request) -> Response:
        # Relative, so that it holds behind a proxy that serves the gateway under a prefix.
        return RedirectResponse("ui/", status_code=308, headers=HEADERS)

    return [
        HttpRoute("/ui", to_page, methods=["GET"]),
        HttpRoute("/ui/", page.index, methods=["GET"]),
        *(HttpRoute(f"/ui/{name}", page.asset, methods=["GET"])
          for name in ASSETS if name != "index.html"),
        HttpRoute(DATA_PATH, data, methods=["GET"]),
    ]
