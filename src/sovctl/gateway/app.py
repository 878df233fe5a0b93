"""The gateway's ASGI application, built from the routing table.

The proxied POST endpoints are the gateway's whole overhead, so they run as a raw ASGI handler
over the gateway's own HTTP/1.1 client (`upstream`): Starlette's Request/Response objects
and httpx cost over a millisecond of CPU a request there, as much as a small embedding takes.
The rest (health, readiness, models, metrics, the 404 and 405 answers) stays on Starlette.
Both pass the same Host and Origin guard (`guard`) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute

from sovctl.engines import engine
from sovctl.errors import ConfigError
from sovctl.gateway import anthropic, rerank, responses, tools, ui, validate
from sovctl.gateway.accounting import Ledger, StreamTally, ask_usage
from sovctl.gateway.apps import CURRENT, Apps
from sovctl.gateway.frontier import Frontier, Outcome, Refusal
from sovctl.gateway.guard import Access, preflight_headers, with_cors
from sovctl.gateway.metrics import Metrics
from sovctl.gateway.upstream import PROPS_TIMEOUT_S, Connection, Upstream, UpstreamError
from sovctl.ledger.store import UNROUTED
from sovctl.runtime.demand import Usage
from sovctl.runtime.documents import (
    FRONTIER_PREFIX,
    LOCAL,
    MEMORY_HELD,
    ProcessState,
    Route,
    RoutesTable,
    StackState,
)
from sovctl.runtime.switch import Ports

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT = "/v1/chat/completions"
# Which model roles may answer which endpoint; the first role listed is the default when a
# request names no model.
ENDPOINT_ROLES = {
    CHAT: ("chat",),
    "/v1/completions": ("completion", "chat"),
    "/v1/embeddings": ("embedding",),
    rerank.ENDPOINT: ("rerank",),
    responses.RESPONSES: ("chat",),
    anthropic.MESSAGES: ("chat",),
    anthropic.COUNT_TOKENS: ("chat",),
}
# The surfaces that tell their errors in a shape of their own (every other: OpenAI's).
ERROR_SHAPES: dict[str, Callable[[JSONResponse], JSONResponse]] = {
    anthropic.MESSAGES: anthropic.retell_error,
    anthropic.COUNT_TOKENS: anthropic.retell_error,
}


def error(status: int, message: str, etype: str, code: str | None = None,
          headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _refusal(r: Refusal) -> JSONResponse:
    """A refusal of the gateway's own (a provider's policy, an app's limits) as its answer."""
    return error(r.status, r.message, r.type, r.code, headers=r.headers or None, param=r.param)


def invalid_request(invalid: validate.Invalid) -> JSONResponse:
    """The 400 that refuses a request the checks found wrong."""
    return error(400, invalid.message, "invalid_request_error", invalid.code, param=invalid.param)


# What an error message must not carry to a client: a traceback, a source location, a path.
LEAK = re.compile(r"""Traceback|File "|\.py\b|(?<![\w.:/])/[^\s/]+/|[A-Za-z]:\\""")
MAX_UPSTREAM_MESSAGE = 500
IDENTIFIER = re.compile(r"[\w.\[\]-]{1,100}")


# llama-server's answer to an embedding or rerank input longer than its batch: a 500 there.
_TOO_LONG = re.compile(r"^input \((\d+) tokens\) is too large to process")


def upstream_error(process: str, status: int, content: bytes) -> JSONResponse:
    """A runtime's error answer, retold in the OpenAI format with nothing internal in it.

    The runtime's own message is kept when it is short and clean (a context length exceeded,
    say); anything else, a crash's traceback above all, is replaced by a pointer to the
    runtime's log, where the runtime writes its tracebacks.
    """
    detail: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        doc = json.loads(content)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            detail = doc["error"]
    message = detail.get("message")
    if not (isinstance(message, str) and 0 < len(message) <= MAX_UPSTREAM_MESSAGE
            and "\n" not in message and not LEAK.search(message)):
        what = "failed on" if status >= 500 else "rejected"
        message = f"the runtime {what} the request (HTTP {status}); see 'sovctl logs {process}'"
    too_long = _TOO_LONG.search(message) if status == 500 else None
    if too_long is not None:
        # The client's input, not the runtime, is at fault: llama-server's own hint (a larger
        # batch) is the operator's remedy, not the client's.
        return error(400, f"the input is {too_long[1]} tokens, more than the model takes at "
                     "once; shorten or split it", "invalid_request_error",
                     "context_length_exceeded")
    code, param = detail.get("code"), detail.get("param")
    return error(status, message, "server_error" if status >= 500 else "invalid_request_error",
                 code if isinstance(code, str) and IDENTIFIER.fullmatch(code) else None,
                 param=param if isinstance(param, str) and IDENTIFIER.fullmatch(param) else None)


_USAGE_KEY = re.compile(rb'"usage"\s*:')
_DECODER = json.JSONDecoder()


def usage(content: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens from an answer's usage object, found without parsing the
    rest: an embeddings answer is mostly vectors, megabytes of them for a batch. A quote
    inside a JSON string is escaped, so the first `"usage":` is a key."""
    found = _USAGE_KEY.search(content)
    if found is None:
        return 0, 0
    try:
        tail = content[found.end():].decode().lstrip()
        doc = _DECODER.raw_decode(tail)[0]
        return int(doc.get("prompt_tokens", 0)), int(doc.get("completion_tokens", 0))
    except (ValueError, TypeError, AttributeError):
        return 0, 0


class RouteState:
    """A route and its admission control: as many requests in flight as the runtime has
    slots, the rest waiting in a bounded queue."""

    def __init__(self, route: Route, run: Path) -> None:
        self.model = route.model
        self.role = route.role
        self.kind = route.kind
        self.process = route.process
        self.runtime = route.runtime
        # Its engine, looked up once: a request reads what it can do, never compares names.
        self.engine = engine(route.runtime)
        # It cannot serve some requests the gateway validates (tools, images): refuse those.
        self.limited = not (self.engine.tools and self.engine.images)
        self.vision = route.vision
        self.slots = route.parallel
        self.slot = asyncio.Semaphore(route.parallel)
        self.waiting = 0
        key = Path(route.key_file).read_text().strip() if route.key_file else None
        self.key = key
        self.upstream = Upstream(route.upstream, key)
        # The runtime's port is the one state.json names for its process once a switch to
        # other weights moved it (sovctl.runtime.switch); a connection pool per port.
        self.upstreams = {self.upstream.port: self.upstream}
        self.ports = Ports(run, route.process)
        self.tools = tools.Capability()  # whether the model's chat template renders tools
        # An on-demand model's requests, as the supervisor sees them (sovctl.runtime.demand).
        self.usage = Usage(run, route.model) if route.on_demand else None

    def upstream_for(self, port: int) -> Upstream:
        """The connections to the runtime on `port`. A new port is other weights: what the
        model was found to take is asked again, and pools no request uses any more close."""
        found = self.upstreams.get(port)
        if found is None:
            busy = self.ports.busy()
            for old in [p for p in self.upstreams if p not in busy]:
                self.upstreams.pop(old).close()
            found = self.upstreams[port] = Upstream(f"http://127.0.0.1:{port}", self.key)
            self.tools = tools.Capability()
        return found


class RuntimeStatus:
    """Reads the supervisor's state file, at most every 0.2 s; or, for a request waiting on a
    load, whenever the file has changed (a stat: 10 ms polls cost little)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._at = 0.0
        self._version: int | None = None  # the mtime of the file last read (ns)
        self._procs: dict[str, ProcessState] = {}

    def processes(self, fresh: bool = False, changed: bool = False) -> dict[str, ProcessState]:
        now = time.monotonic()
        if changed and not fresh:
            try:
                fresh = os.stat(self.path).st_mtime_ns != self._version
            except FileNotFoundError:
                fresh = self._version is not None
        if fresh or now - self._at > 0.2:
            self._at = now
            try:
                self._version = os.stat(self.path).st_mtime_ns
                state = StackState.read(self.path)
            except (ConfigError, FileNotFoundError):
                self._version, state = None, None
            self._procs = {p.name: p for p in state.processes} if state else {}
        return self._procs

    def status(self, process: str, fresh: bool = False, changed: bool = False) -> str:
        p = self.processes(fresh, changed).get(process)
        return str(p.status) if p else "unknown"


def _start(status: int, content_type: bytes, length: int | None = None,
           extra: tuple[tuple[bytes, bytes], ...] = ()) -> Message:
    headers = [(b"content-type", content_type), *extra]
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    return {"type": "http.response.start", "status": status, "headers": headers}


# The states of a runtime that is on its way up again: a request waits for it.
RESTARTING = ("pending", "starting", "backoff")
# An on-demand model's runtime, not running: a request asks for it and waits for it to load.
UNLOADED = "unloaded"
LOAD_POLL = 0.005  # seconds between looks at the state file while a request waits for a load
# The states of a runtime that /ready counts as ready: an unloaded one loads on demand.
READY = ("up", UNLOADED)
STREAM_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
# How long a request waits for the port of a model being switched to other weights: the
# supervisor writes the new port before it retires the old one, so a fresh read finds it.
SWITCH_WAIT_S = 5.0


class Gateway:
    def __init__(self, table: RoutesTable) -> None:
        self.table = table
        run = Path(table.state_file).parent
        self.routes = {r.model: RouteState(r, run) for r in table.routes if r.kind == LOCAL}
        self.frontier = Frontier(table.routes, table.ledger)
        self.ledger = Ledger(table)
        self.limits = table.limits
        self.queue_limit = table.limits.queue_limit
        self.queue_timeout = table.limits.queue_timeout
        self.load_timeout = table.limits.load_timeout
        self.max_body = table.limits.max_body_bytes
        self.access = Access(table.limits, table.auth_required)
        # The keys it takes (its own and the apps'), who each request is, and its app's limits.
        self.apps = Apps(table)
        self.status = RuntimeStatus(Path(table.state_file))
        self.metrics = Metrics()
        # The operator's page (/ui) and the figures it shows.
        self.page = ui.Page(table.state_file, table.ledger, table.home, self.metrics,
                            self.frontier, self.routes.values)
        # Recent Responses conversations, for previous_response_id: in the run folder.
        self.responses = responses.Store(Path(table.state_file).parent / responses.STORE_FILE)

    def close(self) -> None:
        for route in self.routes.values():
            for upstream in route.upstreams.values():
                upstream.close()
        self.ledger.close()
        self.responses.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _authorised(self, given: bytes) -> bool:
        """An Authorization header with the gateway's key or an app's, where one is needed."""
        scheme, _, token = given.partition(b" ")
        return self.apps.authorised(token if scheme.lower() == b"bearer" else None)

    def _authorised_key(self, given: bytes | None) -> bool:
        """The key as Anthropic's clients send it, in x-api-key."""
        return self.apps.authorised(given)

    def _authorised_request(self, request: Request) -> bool:
        return self._authorised(request.headers.get("authorization", "").encode("latin-1"))

    def _unauthorised(self) -> JSONResponse:
        # Counted, never recorded in the ledger: whoever reaches the port could fill the disk.
        self.metrics.refuse("auth")
        return error(401, "missing or wrong API key: send Authorization: Bearer <key> (or "
                     "x-api-key: <key>)",
                     "invalid_request_error", "invalid_api_key",
                     headers={"WWW-Authenticate": "Bearer"})

    def _refused(self, host: bytes | None, origin: bytes | None) -> JSONResponse | None:
        """The 403 for a request the Host and Origin guard refuses; None when it passes."""
        refusal = self.access.refusal(host, origin)
        if refusal is None:
            return None
        self.metrics.refuse(refusal.reason)
        return error(403, refusal.message, "permission_denied", refusal.code)

    async def guarded(self, scope: Scope, receive: Receive, send: Send, app: Starlette
                      ) -> None:
        """An HTTP request for a Starlette route, past the guard; a CORS preflight of an
        allowed origin is answered here."""
        headers = _headers(scope)
        origin = headers.get(b"origin")
        refused = self._refused(headers.get(b"host"), origin)
        if refused is not None:
            await refused(scope, receive, send)
        elif origin is None:
            await app(scope, receive, send)
        elif scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await send({"type": "http.response.start", "status": 204, "headers":
                        preflight_headers(origin,
                                          headers.get(b"access-control-request-headers"))})
            await send({"type": "http.response.body", "body": b""})
        else:
            await app(scope, receive, with_cors(send, origin))

    def _too_large(self) -> JSONResponse:
        return error(413, f"request body over {self.max_body} bytes", "invalid_request_error",
                     "body_too_large")

    async def _read_body(self, declared: bytes | None, receive: Receive) -> bytes | Response:
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return self._too_large()
        chunks = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self._too_large()
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _pick(self, endpoint: str, model: Any) -> RouteState | JSONResponse:
        roles = ENDPOINT_ROLES[endpoint]
        if model is None:
            for role in roles:
                for r in self.routes.values():
                    if r.role == role:
                        return r
            return error(404, f"no model serves {endpoint} here", "invalid_request_error",
                         "model_not_found")
        if not isinstance(model, str) or model not in self.routes:
            return error(404, f"model {model!r} is not served here; available: "
                         f"{', '.join(sorted(self.routes))}", "invalid_request_error",
                         "model_not_found")
        route = self.routes[model]
        if route.role not in roles:
            return error(400, f"model {model!r} is a {route.role} model and cannot serve "
                         f"{endpoint}", "invalid_request_error", "model_role_mismatch")
        return route

    # -- endpoints on Starlette ----------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if not self._authorised_request(request):
            return self._unauthorised()
        runtimes = {r.process: self.status.status(r.process) for r in self.routes.values()}
        ok = all(s in READY for s in runtimes.values())
        return JSONResponse({"ready": ok, "runtimes": runtimes}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        if not self._authorised_request(request):
            return self._unauthorised()
        routes = list(self.routes.values())
        takes_tools = await asyncio.gather(*(self._tools_known(r) for r in routes))
        procs = self.status.processes()
        data = [{"id": r.model, "object": "model", "created": 0, "owned_by": "sovctl",
                 "role": r.role, "route": r.kind, "runtime": r.runtime,
                 "parallel": r.slots, "status": self.status.status(r.process),
                 **self._load_info(procs.get(r.process)),
                 "capabilities": {"tools": known, "vision": r.vision}}
                for r, known in zip(routes, takes_tools, strict=True)]
        return JSONResponse({"object": "list", "data": data})

    @staticmethod
    def _load_info(p: ProcessState | None) -> dict[str, Any]:
        """A local model's place in memory, as the supervisor last wrote it."""
        if p is None or not p.load_state:
            return {}
        return {"load": p.load, "pinned": p.pinned, "load_state": p.load_state,
                "last_used": p.last_used, "memory_estimated": p.memory_estimated,
                "memory_held": p.memory_held}

    async def _tools_known(self, route: RouteState) -> bool | None:
        """Whether the model takes tools; None while its runtime cannot say, or for a model
        sovctl does not run."""
        if route.kind != LOCAL:
            return None
        if route.role != "chat":
            return False
        if route.tools.known is None and self.status.status(route.process) != "up":
            return None
        try:
            return await self._takes_tools(route)
        except UpstreamError:
            return None

    async def _takes_tools(self, route: RouteState) -> bool:
        """Whether the model sees the tools of a request: an engine without tools drops
        them, one with renders them when the template has a place for them (its props path,
        llama-server's /props, says so). Raises UpstreamError when the runtime does not
        answer."""
        props = route.engine.props_path
        if not (route.engine.tools and props):
            return False

        async def ask() -> bool:
            try:
                async with asyncio.timeout(PROPS_TIMEOUT_S):
                    status, _, content = await self._ask(route, b"GET", props)
            except TimeoutError as e:
                raise UpstreamError(f"no answer to {props}") from e
            if not 200 <= status < 300:
                raise UpstreamError(f"{props} answered HTTP {status}")
            return tools.supports_tools(content)

        return await route.tools.get(ask)

    async def metrics_text(self, request: Request) -> Response:
        if not self._authorised_request(request):
            return self._unauthorised()
        procs = list(self.status.processes().values())
        waiting = {r.model: r.waiting for r in self.routes.values()}
        return PlainTextResponse(self.metrics.render(procs, waiting),
                                 media_type="text/plain; version=0.0.4")

    # -- the proxied endpoints, raw ASGI -------------------------------------------------------
    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = scope["path"]
        started = time.perf_counter()
        headers = _headers(scope)
        origin = headers.get(b"origin")
        refused = self._refused(headers.get(b"host"), origin)
        if refused is None:
            if origin is not None:
                # An allowed page reads every answer, a 401 for a key it lacks included.
                send = with_cors(send, origin)
            app = self.apps.identify(headers)
            if app is None:
                refused = self._unauthorised()
        shape = ERROR_SHAPES.get(endpoint)
        if refused is not None:
            if shape is not None:
                refused = shape(refused)
            await refused(scope, receive, send)
            return
        assert app is not None
        CURRENT.set(app)
        over = self.apps.admit(app)
        if over is not None:
            # Over one of its app's limits: refused before the body is read.
            answer: tuple[str, Response] | None = ("-", _refusal(over))
        else:
            try:
                answer = await self._proxy(scope, receive, send, endpoint, started,
                                           headers.get(b"content-length"))
            except _ClientGone:
                return
            finally:
                self.apps.leave(app)
        if answer is not None:
            model, response = answer
            if shape is not None and isinstance(response, JSONResponse):
                response = shape(response)
            await response(scope, receive, send)
            seconds = time.perf_counter() - started
            self.metrics.request(model, endpoint, response.status_code, seconds)
            self.metrics.app_request(app, response.status_code)
            self.ledger.local(model, endpoint, response.status_code, seconds, 0, 0, app=app)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, endpoint: str,
                     started: float, declared: bytes | None) -> tuple[str, Response] | None:
        """Serves the request; returns what is left to send (an error) with the model to
        count it under, or None when the answer went out already."""
        body = await self._read_body(declared, receive)
        if isinstance(body, Response):
            return "-", body
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return "-", error(400, f"request body is not valid JSON: {e}",
                              "invalid_request_error", "invalid_json")
        except RecursionError:
            return "-", _too_deep()
        if not isinstance(payload, dict):
            return "-", error(400, "request body must be a JSON object", "invalid_request_error",
                              "invalid_json")
        if validate.too_deep(body):
            return "-", _too_deep()
        model = payload.get("model")
        invalid = validate.model_name(model)
        if invalid is not None:
            return "-", invalid_request(invalid)
        if isinstance(model, str) and model.startswith(FRONTIER_PREFIX):
            return await self._frontier(scope, receive, send, endpoint, model, payload, started)
        route = self._pick(endpoint, model)
        if isinstance(route, Response):
            return "-", route
        invalid = _check(endpoint, payload)
        if invalid is None and endpoint == responses.RESPONSES:
            invalid = responses.beyond_engine(route.model, route.engine)
        seen = payload  # what the engine and image checks read: a chat request
        if invalid is None and endpoint in anthropic.ENDPOINTS:
            invalid = anthropic.beyond_engine(route.model, route.engine)
            seen = anthropic.to_chat(payload)
        if invalid is None and route.limited:
            invalid = validate.beyond_engine(route.model, seen, route.engine)
        if invalid is None and route.kind == LOCAL and not route.vision:
            # Without a projector llama-server answers an image with a 500: say instead what
            # would read it.
            invalid = validate.without_projector(route.model, seen)
        if invalid is None and route.vision:
            invalid = self._images(seen)
        if invalid is not None:
            return "-", invalid_request(invalid)
        if "model" not in payload:
            payload["model"] = route.model
            body = json.dumps(payload).encode()
        usage = route.usage
        if usage is None:
            return await self._local(route, endpoint, payload, body, receive, send, started)
        # An on-demand model: the request is counted in flight, so its runtime is not unloaded
        # under it; while the supervisor is unloading it, the request waits for that first.
        deadline = time.monotonic() + self.load_timeout
        while (first := usage.enter()) is None:
            if time.monotonic() >= deadline:
                return route.model, error(
                    503, f"runtime for {route.model!r} is being unloaded; retry later",
                    "service_unavailable", "runtime_unavailable", headers={"Retry-After": "2"})
            await asyncio.sleep(0.1)
        try:
            return await self._local(route, endpoint, payload, body, receive, send, started,
                                     fresh=first)
        finally:
            usage.leave()

    def _no_room(self, route: RouteState, final: bool = False) -> Response | None:
        """The 503 for a model whose load waits for memory, naming what holds it: at once
        (`final`) when nothing may be evicted for it, else when the wait has run out."""
        p = self.status.processes().get(route.process)
        if p is None or not p.memory_wait or (final and p.memory_wait_kind != MEMORY_HELD):
            return None
        return error(503, f"no memory to load {route.model!r}: {p.memory_wait}; retry later",
                     "service_unavailable", "insufficient_memory",
                     headers={"Retry-After": "10" if final else "2"})

    async def _local(self, route: RouteState, endpoint: str, payload: dict[str, Any],
                     body: bytes, receive: Receive, send: Send, started: float,
                     fresh: bool = False) -> tuple[str, Response] | None:
        """A request for a local model, checked: waits for its runtime, then serves it.
        `fresh`: the runtime's status is read afresh, not from the last 0.2 s."""
        status = self.status.status(route.process, fresh)
        if status in RESTARTING or (status == UNLOADED and route.usage is not None):
            # A quick restart (a crash, a lost or returning worker) is waited out, up to the
            # queue's bounds, rather than answered with 503; the state file is read at most
            # every 0.2 s however many requests wait. A runtime given up on is not waited for.
            if route.waiting >= self.queue_limit:
                return route.model, self._queue_full(route)
            route.waiting += 1
            try:
                # A cold model gets the time a load takes; one restarting, the queue's.
                deadline = time.monotonic() + (self.load_timeout if status == UNLOADED
                                               else self.queue_timeout)
                while (status in RESTARTING or status == UNLOADED) \
                        and time.monotonic() < deadline:
                    if status == UNLOADED and route.usage is not None:
                        # One request file however many wait; written again if the model
                        # was unloaded once more meanwhile. A client hanging up cancels nothing.
                        route.usage.request_load()
                        if (no_room := self._no_room(route, final=True)) is not None:
                            return route.model, no_room
                    if route.usage is not None:
                        # A load (or a switch) a request waits for: seen within 10 ms of the
                        # supervisor writing it.
                        await asyncio.sleep(LOAD_POLL)
                        status = self.status.status(route.process, changed=True)
                    else:
                        await asyncio.sleep(0.25)
                        status = self.status.status(route.process)
            finally:
                route.waiting -= 1
            if status == UNLOADED and (no_room := self._no_room(route)) is not None:
                return route.model, no_room
        if status != "up":
            wait = "30" if status == "failed" else "2"
            return route.model, error(
                503, f"runtime for {route.model!r} is {status}; retry later"
                + (" (it keeps crashing: see 'sovctl status' and 'sovctl logs')"
                   if status == "failed" else ""),
                "service_unavailable", "runtime_unavailable", headers={"Retry-After": wait})
        forced = None
        if endpoint in (CHAT, responses.RESPONSES, anthropic.MESSAGES) and route.kind == LOCAL:
            calls = await self._tool_policy(
                route, payload if endpoint == CHAT else responses.chat_tools(payload)
                if endpoint == responses.RESPONSES else anthropic.tool_view(payload))
            if isinstance(calls, Response):
                return route.model, calls
            forced = calls
        sent: list[dict[str, Any]] | None = None
        if endpoint == responses.RESPONSES:
            # The conversation a previous_response_id continues, or its 400.
            conversation = responses.conversation(payload, self.responses, route.model)
            if isinstance(conversation, validate.Invalid):
                return route.model, invalid_request(conversation)
            sent = conversation
        if route.waiting >= self.queue_limit:
            return route.model, self._queue_full(route)
        route.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await route.slot.acquire()
        except TimeoutError:
            return route.model, error(
                503, f"waited {self.queue_timeout:.0f}s for {route.model!r}",
                "service_unavailable", "queue_timeout", headers={"Retry-After": "5"})
        finally:
            route.waiting -= 1
        try:
            if sent is not None:
                return await self._respond(route, payload, sent, forced, receive, send,
                                           started)
            if forced is not None:
                return await self._call_tool(route, endpoint, payload, forced, send, started)
            if endpoint == anthropic.MESSAGES and payload.get("stream"):
                return await self._stream(route, endpoint, body, True, receive, send, started,
                                          anthropic.Tally(route.model))
            if payload.get("stream"):
                # Every stream is asked for its usage, for the ledger; the client sees it only
                # when it asked too.
                keep_usage = ask_usage(payload)
                return await self._stream(route, endpoint, json.dumps(payload).encode(),
                                          keep_usage, receive, send, started)
            reshape = rerank.reshape(payload) if endpoint == rerank.ENDPOINT else None
            return await self._forward(route, endpoint, body, send, started, reshape)
        finally:
            route.slot.release()

    async def _tool_policy(self, route: RouteState, payload: dict[str, Any]
                           ) -> list[dict[str, Any]] | Response | None:
        """The tools a chat request must call one of (the gateway enforces the call), None
        when the runtime serves it as it is, or the error that refuses it: tools the model
        would never see, or a tool_choice the tools cannot meet."""
        if payload.get("tools"):
            try:
                takes_tools = await self._takes_tools(route)
            except UpstreamError as e:
                return self._unanswered(route, e)[1]
            if not takes_tools:
                return invalid_request(tools.unsupported(route.model))
        forced = tools.forced(payload)
        if isinstance(forced, validate.Invalid):
            return invalid_request(forced)
        return forced

    def _queue_full(self, route: RouteState) -> JSONResponse:
        return error(429, f"{route.waiting} requests already wait for {route.model!r} "
                     f"(queue limit {self.queue_limit})", "rate_limit_exceeded", "queue_full",
                     headers={"Retry-After": "1"})

    def _images(self, payload: dict[str, Any]) -> validate.Invalid | None:
        limits = self.limits
        return validate.images(payload, limits.max_images, limits.max_image_bytes,
                               limits.max_image_pixels)

    def _unanswered(self, route: RouteState, e: UpstreamError) -> tuple[str, Response]:
        return route.model, error(503, f"runtime for {route.model!r} did not answer: {e}",
                                  "service_unavailable", "runtime_unavailable",
                                  headers={"Retry-After": "2"})

    async def _lease(self, route: RouteState) -> int:
        """The port of the runtime to send a request to, counted in (`route.ports.leave` it
        once the answer is read): the one state.json names for the route's process, else
        routes.json's. A port being retired by a switch to other weights is refused, and
        state.json read afresh until it names the new one. Raises UpstreamError when none
        can be had."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        fresh = False
        while True:
            p = self.status.processes(fresh).get(route.process)
            port = p.port if p is not None and p.port else route.upstream.port
            if route.ports.enter(port):
                return port
            if time.monotonic() >= deadline:
                raise UpstreamError(f"its runtime on port {port} is being replaced")
            fresh = True
            await asyncio.sleep(0.01)

    async def _ask(self, route: RouteState, method: bytes, path: str, body: bytes = b""
                   ) -> tuple[int, bytes, bytes]:
        """The runtime's whole answer: its status, content type and body. Raises
        UpstreamError when there is none."""
        port = await self._lease(route)
        try:
            upstream = route.upstream_for(port)
            conn = await upstream.request(method, path, body)
            try:
                status = await conn.head()
                return status, conn.content_type, await conn.body()
            finally:
                upstream.release(conn)
        finally:
            route.ports.leave(port)

    async def _forward(self, route: RouteState, endpoint: str, body: bytes, send: Send,
                       started: float, reshape: Callable[[bytes], bytes] | None = None
                       ) -> tuple[str, Response] | None:
        try:
            status, content_type, content = await self._ask(route, b"POST", endpoint, body)
        except UpstreamError as e:
            return self._unanswered(route, e)
        if not 200 <= status < 300:
            return route.model, upstream_error(route.process, status, content)
        if reshape is not None:
            content = reshape(content)
        if endpoint in anthropic.ENDPOINTS:
            content, tokens = anthropic.answer(content, route.model)
        else:
            tokens = usage(content)
        await send(_start(status, content_type, len(content)))
        await send({"type": "http.response.body", "body": content})
        self._account(route.model, endpoint, status, time.perf_counter() - started, *tokens)
        return None

    def _account(self, model: str, endpoint: str, status: int, seconds: float, tokens_in: int,
                 tokens_out: int, estimated: bool = False) -> None:
        """The accounting tail of a request a runtime answered: its tokens and its request in
        the metrics, its row in the ledger."""
        app = CURRENT.get()
        self.metrics.count_tokens(model, tokens_in, tokens_out)
        self.metrics.request(model, endpoint, status, seconds)
        self.metrics.app_request(app, status, tokens_in, tokens_out)
        self.apps.count(app, tokens_in + tokens_out)
        self.ledger.local(model, endpoint, status, seconds, tokens_in, tokens_out, app=app,
                          estimated=estimated)

    async def _call_tool(self, route: RouteState, endpoint: str, payload: dict[str, Any],
                         offered: list[dict[str, Any]], send: Send, started: float
                         ) -> tuple[str, Response] | None:
        """A call the request demands, of one of `offered`: the runtime writes it whole under
        the call's schema, and the client gets it as an OpenAI tool call, or as the events
        of one when it asked for a stream; on Messages, as a message with one tool_use block
        (or its events), the request retold as a chat one."""
        messages = endpoint == anthropic.MESSAGES
        chat = anthropic.to_chat(payload) if messages else payload
        try:
            status, _, content = await self._ask(
                route, b"POST", CHAT, tools.constrained_request(chat, offered))
        except UpstreamError as e:
            return self._unanswered(route, e)
        if not 200 <= status < 300:
            return route.model, upstream_error(route.process, status, content)
        try:
            doc = tools.tool_call_answer(content, offered)
        except ValueError:
            return route.model, error(
                502, f"runtime for {route.model!r} answered with no call of the tools offered",
                "server_error", "runtime_failed")
        message = anthropic.from_chat(doc, route.model) if messages else None
        if payload.get("stream"):
            if message is not None:
                data = anthropic.stream_events(message)
            else:
                include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
                data = tools.stream_events(doc, include_usage)
            self.metrics.ttft[route.model].observe(time.perf_counter() - started)
            await send(_start(200, b"text/event-stream; charset=utf-8", len(data),
                              STREAM_HEADERS))
        else:
            data = json.dumps(message if message is not None else doc).encode()
            await send(_start(200, b"application/json", len(data)))
        await send({"type": "http.response.body", "body": data})
        self._account(route.model, endpoint, 200, time.perf_counter() - started,
                      *usage(content))
        return None

    async def _respond(self, route: RouteState, payload: dict[str, Any],
                       sent: list[dict[str, Any]], forced: list[dict[str, Any]] | None,
                       receive: Receive, send: Send, started: float
                       ) -> tuple[str, Response] | None:
        """A Responses request (`responses`): streamed through from the runtime, or answered
        whole (a demanded call too, retold as events when the client asked for a stream);
        its conversation kept for a later previous_response_id."""
        body = responses.runtime_request(payload, sent, forced)
        if payload.get("stream") and forced is None:
            tally = responses.ResponsesTally(route.model, payload)
            answer = await self._stream(route, responses.RESPONSES, body, True, receive, send,
                                        started, tally)
            responses.remember(self.responses, payload, sent, tally.final)
            return answer
        try:
            status, _, content = await self._ask(route, b"POST", responses.RESPONSES, body)
        except UpstreamError as e:
            return self._unanswered(route, e)
        if not 200 <= status < 300:
            return route.model, upstream_error(route.process, status, content)
        try:
            doc = responses.finish(json.loads(content), route.model, payload)
            if forced is not None:
                doc = responses.function_call_answer(doc, forced,
                                                     payload.get("max_output_tokens"))
        except (ValueError, TypeError, AttributeError, KeyError):
            return route.model, error(
                502, f"runtime for {route.model!r} answered with no "
                + ("call of the tools offered" if forced is not None else "valid response"),
                "server_error", "runtime_failed")
        responses.remember(self.responses, payload, sent, doc)
        if payload.get("stream"):
            data = responses.events(doc)
            self.metrics.ttft[route.model].observe(time.perf_counter() - started)
            await send(_start(200, b"text/event-stream; charset=utf-8", len(data),
                              STREAM_HEADERS))
        else:
            data = json.dumps(doc).encode()
            await send(_start(200, b"application/json", len(data)))
        await send({"type": "http.response.body", "body": data})
        self._account(route.model, responses.RESPONSES, 200, time.perf_counter() - started,
                      *(responses.usage(doc) or (0, 0)))
        return None

    async def _frontier(self, scope: Scope, receive: Receive, send: Send, endpoint: str,
                        model: str, payload: dict[str, Any], started: float
                        ) -> tuple[str, Response] | None:
        """A request that names a provider: served there (on a surface its kind speaks), or
        refused, in the surface's error shape; never locally."""
        invalid = _check(endpoint, payload)
        if invalid is None and endpoint == CHAT:
            invalid = self._images(payload)
        if invalid is None and endpoint == anthropic.MESSAGES:
            invalid = self._images(anthropic.to_chat(payload))
        if invalid is not None:
            return "-", invalid_request(invalid)
        app = CURRENT.get()
        provider = model.removeprefix(FRONTIER_PREFIX).partition("/")[0]
        # A provider the app may not use; its frontier_daily_cap is reserved against as the
        # provider's daily_cap is.
        over = (self.apps.frontier(app, provider) if provider in self.frontier.providers
                else None)
        out = (Outcome(provider, over.status, refusal=over) if over is not None else
               await self.frontier.serve(endpoint, model, payload, scope["headers"], receive,
                                         send, self.apps.caps(app)))
        if out.refusal is not None:
            refusal = _refusal(out.refusal)
            shape = ERROR_SHAPES.get(endpoint)
            await (shape(refusal) if shape is not None else refusal)(scope, receive, send)
        seconds = time.perf_counter() - started
        # Metrics by provider: the model part is the client's to choose, without bound.
        label = FRONTIER_PREFIX + out.route if out.route != UNROUTED else "-"
        self.metrics.count_tokens(label, out.tokens_in, out.tokens_out)
        self.metrics.request(label, endpoint, out.status, seconds)
        self.metrics.app_request(app, out.status, out.tokens_in, out.tokens_out)
        self.apps.count(app, out.tokens_in + out.tokens_out)
        self.ledger.routed(out.route, model, endpoint, out.status, seconds, out.tokens_in,
                           out.tokens_out, out.cost, app=app, estimated=out.estimated)
        return None

    async def _stream(self, route: RouteState, endpoint: str, body: bytes, keep_usage: bool,
                      receive: Receive, send: Send, started: float,
                      tally: StreamTally | None = None) -> tuple[str, Response] | None:
        try:
            port = await self._lease(route)
        except UpstreamError as e:
            return self._unanswered(route, e)
        try:
            conn = await route.upstream_for(port).request(b"POST", endpoint, body)
        except BaseException as e:
            # Counted out whatever ends it (a client gone cancels the task): a port still
            # counted in would never be retired.
            route.ports.leave(port)
            if isinstance(e, UpstreamError):
                return self._unanswered(route, e)
            raise
        # A client that hangs up must stop the generation: closing the connection to the
        # runtime is what tells it, and frees its slot.
        watcher = asyncio.ensure_future(_hang_up(receive, conn))
        streaming = False
        tally = tally if tally is not None else StreamTally(keep_usage)
        code = 200
        try:
            try:
                status = await conn.head()
                if not 200 <= status < 300:
                    return route.model, upstream_error(route.process, status,
                                                       await conn.body())
                # The status line waits for the first event and goes out with it: the client
                # is not woken twice while the runtime computes the first token, and a runtime
                # that fails before answering anything still gets a status that says so.
                data = await conn.chunk()
            except UpstreamError as e:
                if watcher.done():
                    raise _ClientGone from e
                return self._unanswered(route, e)
            self.metrics.ttft[route.model].observe(time.perf_counter() - started)
            await send(_start(200, b"text/event-stream; charset=utf-8", extra=STREAM_HEADERS))
            streaming = True
            try:
                while data:
                    out = tally.feed(data)
                    if out:
                        await send({"type": "http.response.body", "body": out,
                                    "more_body": True})
                    data = await conn.chunk()
                rest = tally.end()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            except UpstreamError as e:
                if watcher.done():
                    raise _ClientGone from e
                code = 502
                # The status line is gone already: say so in the stream, never end it silently.
                said = f"runtime for {route.model!r} failed mid-stream: {e}"
                err = {"error": {"message": said, "type": "server_error",
                                 "code": "runtime_failed"}}
                await send({"type": "http.response.body", "more_body": True,
                            "body": anthropic.stream_error(said)
                            if endpoint == anthropic.MESSAGES
                            else f"data: {json.dumps(err)}\n\n".encode()})
            await send({"type": "http.response.body", "body": b""})
            return None
        finally:
            watcher.cancel()
            # Never reused: llama-server closes the connection after a streamed answer without
            # saying so in its headers, and the next request sent on it would be lost.
            conn.close()
            route.ports.leave(port)
            if streaming:
                # The usage the runtime reports; one that reports none (llama-cpp-python)
                # carries one generated token in each data event.
                tokens = tally.usage or (0, tally.events)
                self._account(route.model, endpoint, code, time.perf_counter() - started,
                              *tokens, estimated=tally.usage is None)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """A request's headers by their (lower-case, as ASGI gives them) names, built at C speed;
    of a repeated header the last."""
    return dict(scope["headers"])


def _check(endpoint: str, payload: dict[str, Any]) -> validate.Invalid | None:
    if endpoint in anthropic.ENDPOINTS:
        return anthropic.check(endpoint, payload)
    if endpoint == responses.RESPONSES:
        return responses.check(payload)
    return validate.check(endpoint, payload)


def _too_deep() -> JSONResponse:
    return error(400, f"request body nests deeper than {validate.MAX_DEPTH} levels of objects "
                 "and lists", "invalid_request_error", "nesting_too_deep")


class _ClientGone(Exception):
    """The client hung up: there is no one left to answer."""


async def _hang_up(receive: Receive, conn: Connection) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    conn.close()


class _Proxy:
    """The proxied endpoints as an ASGI app, which Starlette mounts as it is."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.proxy(scope, receive, send)


class GatewayApp:
    """The ASGI entry point: a proxied request goes straight to the gateway, skipping
    Starlette's middleware and routing; every other request to Starlette past the guard, and
    the lifespan to Starlette."""

    def __init__(self, gateway: Gateway, starlette: Starlette) -> None:
        self.gateway = gateway
        self.starlette = starlette

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
        elif scope["method"] == "POST" and scope["path"] in ENDPOINT_ROLES:
            await self.gateway.proxy(scope, receive, send)
        else:
            await self.gateway.guarded(scope, receive, send, self.starlette)


def create_app(table: RoutesTable) -> GatewayApp:
    gw = Gateway(table)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            gw.close()
            await gw.frontier.aclose()

    routes = [
        HttpRoute("/health", gw.health, methods=["GET"]),
        HttpRoute("/ready", gw.ready, methods=["GET"]),
        HttpRoute("/metrics", gw.metrics_text, methods=["GET"]),
        HttpRoute("/v1/models", gw.models, methods=["GET"]),
        *ui.routes(gw.page, gw.apps, gw._unauthorised),
        # Starlette knows the proxied paths too: another method on one gets its 405, and the
        # path with a trailing slash its redirect.
        *(HttpRoute(ep, _Proxy(gw), methods=["POST"]) for ep in ENDPOINT_ROLES),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no route {request.method} {request.url.path}",
                     "invalid_request_error", "not_found")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}",
                     "invalid_request_error", "method_not_allowed")

    return GatewayApp(gw, Starlette(routes=routes, lifespan=lifespan,
                                    exception_handlers={404: not_found, 405: bad_method}))
