"""The gateway's ASGI application (Starlette), built from the routing table."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from sovctl.errors import ConfigError
from sovctl.gateway import validate
from sovctl.gateway.metrics import Metrics
from sovctl.runtime.documents import ProcessState, Route, RoutesTable, StackState

# Which model roles may answer which endpoint; the first role listed is the default when a
# request names no model.
ENDPOINT_ROLES = {
    "/v1/chat/completions": ("chat",),
    "/v1/completions": ("completion", "chat"),
    "/v1/embeddings": ("embedding",),
}


def error(status: int, message: str, etype: str, code: str | None = None,
          headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# What an error message must not carry to a client: a traceback, a source location, a path.
LEAK = re.compile(r"""Traceback|File "|\.py\b|(?<![\w.:/])/[^\s/]+/|[A-Za-z]:\\""")
MAX_UPSTREAM_MESSAGE = 500
IDENTIFIER = re.compile(r"[\w.\[\]-]{1,100}")


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
    code, param = detail.get("code"), detail.get("param")
    return error(status, message, "server_error" if status >= 500 else "invalid_request_error",
                 code if isinstance(code, str) and IDENTIFIER.fullmatch(code) else None,
                 param=param if isinstance(param, str) and IDENTIFIER.fullmatch(param) else None)


class RouteState:
    """A route and its admission control: as many requests in flight as the runtime has
    slots, the rest waiting in a bounded queue."""

    def __init__(self, route: Route) -> None:
        self.model = route.model
        self.role = route.role
        self.kind = route.kind
        self.process = route.process
        self.upstream = route.upstream
        self.runtime = route.runtime
        self.slots = route.parallel
        self.slot = asyncio.Semaphore(route.parallel)
        self.waiting = 0
        self.headers = {"content-type": "application/json"}
        if route.key_file:
            key = Path(route.key_file).read_text().strip()
            self.headers["authorization"] = f"Bearer {key}"


class RuntimeStatus:
    """Reads the supervisor's state file, at most every 0.2 s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._at = 0.0
        self._procs: dict[str, ProcessState] = {}

    def processes(self) -> dict[str, ProcessState]:
        now = time.monotonic()
        if now - self._at > 0.2:
            self._at = now
            try:
                state = StackState.read(self.path)
            except ConfigError:
                state = None
            self._procs = {p.name: p for p in state.processes} if state else {}
        return self._procs

    def status(self, process: str) -> str:
        p = self.processes().get(process)
        return str(p.status) if p else "unknown"


class Gateway:
    def __init__(self, table: RoutesTable) -> None:
        self.table = table
        self.routes = {r.model: RouteState(r) for r in table.routes}
        self.queue_limit = table.limits.queue_limit
        self.queue_timeout = table.limits.queue_timeout
        self.max_body = table.limits.max_body_bytes
        self.key: str | None = None
        if table.auth_required:
            self.key = Path(table.key_file).read_text().strip()
        self.status = RuntimeStatus(Path(table.state_file))
        self.metrics = Metrics()
        self.client: httpx.AsyncClient | None = None

    # -- plumbing ----------------------------------------------------------------------------
    def _authorised(self, request: Request) -> bool:
        if self.key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(),
                                                                  self.key.encode())

    def _unauthorised(self) -> JSONResponse:
        return error(401, "missing or wrong API key: send Authorization: Bearer <key>",
                     "invalid_request_error", "invalid_api_key",
                     headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return error(413, f"request body over {self.max_body} bytes",
                         "invalid_request_error", "body_too_large")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                return error(413, f"request body over {self.max_body} bytes",
                             "invalid_request_error", "body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

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

    # -- endpoints -----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        runtimes = {r.process: self.status.status(r.process) for r in self.routes.values()}
        ok = all(s == "up" for s in runtimes.values())
        return JSONResponse({"ready": ok, "runtimes": runtimes}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        data = [{"id": r.model, "object": "model", "created": 0, "owned_by": "sovctl",
                 "role": r.role, "route": r.kind, "runtime": r.runtime,
                 "parallel": r.slots, "status": self.status.status(r.process)}
                for r in self.routes.values()]
        return JSONResponse({"object": "list", "data": data})

    async def metrics_text(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        procs = list(self.status.processes().values())
        waiting = {r.model: r.waiting for r in self.routes.values()}
        return PlainTextResponse(self.metrics.render(procs, waiting),
                                 media_type="text/plain; version=0.0.4")

    async def proxy(self, request: Request) -> Response:
        endpoint = request.url.path
        started = time.perf_counter()
        response = await self._proxy(request, endpoint, started)
        if not isinstance(response, StreamingResponse):
            model = getattr(request.state, "model", "-")
            self.metrics.request(model, endpoint, response.status_code,
                                 time.perf_counter() - started)
        return response

    async def _proxy(self, request: Request, endpoint: str, started: float) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"request body is not valid JSON: {e}", "invalid_request_error",
                         "invalid_json")
        if not isinstance(payload, dict):
            return error(400, "request body must be a JSON object", "invalid_request_error",
                         "invalid_json")
        route = self._pick(endpoint, payload.get("model"))
        if isinstance(route, Response):
            return route
        invalid = validate.check(endpoint, payload)
        if invalid is not None:
            return error(400, invalid.message, "invalid_request_error", invalid.code,
                         param=invalid.param)
        request.state.model = route.model
        if "model" not in payload:
            payload["model"] = route.model
            body = json.dumps(payload).encode()
        status = self.status.status(route.process)
        if status != "up":
            wait = "30" if status == "failed" else "2"
            return error(503, f"runtime for {route.model!r} is {status}; retry later"
                         + (" (it keeps crashing: see 'sovctl status' and 'sovctl logs')"
                            if status == "failed" else ""),
                         "service_unavailable", "runtime_unavailable",
                         headers={"Retry-After": wait})
        if route.waiting >= self.queue_limit:
            return error(429, f"{route.waiting} requests already wait for {route.model!r} "
                         f"(queue limit {self.queue_limit})", "rate_limit_exceeded",
                         "queue_full", headers={"Retry-After": "1"})
        route.waiting += 1
        try:
            await asyncio.wait_for(route.slot.acquire(), timeout=self.queue_timeout)
        except TimeoutError:
            return error(503, f"waited {self.queue_timeout:.0f}s for {route.model!r}",
                         "service_unavailable", "queue_timeout", headers={"Retry-After": "5"})
        finally:
            route.waiting -= 1
        lease = _Lease(route.slot)
        try:
            if payload.get("stream"):
                return await self._stream(route, lease, endpoint, body, started)
            return await self._forward(route, endpoint, body)
        finally:
            # A stream hands its lease to the response, which releases it when it ends.
            if not lease.handed_over:
                lease.release()

    async def _forward(self, route: RouteState, endpoint: str, body: bytes) -> Response:
        assert self.client is not None
        try:
            up = await self.client.post(route.upstream + endpoint, content=body,
                                        headers=route.headers)
        except httpx.TransportError as e:
            return error(503, f"runtime for {route.model!r} did not answer: "
                         f"{type(e).__name__}", "service_unavailable", "runtime_unavailable",
                         headers={"Retry-After": "2"})
        if not up.is_success:
            return upstream_error(route.process, up.status_code, up.content)
        try:
            usage = up.json().get("usage") or {}
            self.metrics.count_tokens(route.model, int(usage.get("prompt_tokens", 0)),
                                      int(usage.get("completion_tokens", 0)))
        except (ValueError, AttributeError):
            pass
        return Response(up.content, status_code=up.status_code,
                        media_type=up.headers.get("content-type", "application/json"))

    async def _stream(self, route: RouteState, lease: _Lease, endpoint: str, body: bytes,
                      started: float) -> Response:
        assert self.client is not None
        req = self.client.build_request("POST", route.upstream + endpoint, content=body,
                                        headers=route.headers)
        try:
            up = await self.client.send(req, stream=True)
        except httpx.TransportError as e:
            return error(503, f"runtime for {route.model!r} did not answer: "
                         f"{type(e).__name__}", "service_unavailable", "runtime_unavailable",
                         headers={"Retry-After": "2"})
        if not up.is_success:
            content = await up.aread()
            await up.aclose()
            return upstream_error(route.process, up.status_code, content)
        lease.handed_over = True

        async def close() -> None:
            await up.aclose()
            lease.release()

        return _ClosingStream(close, self._relay(route, endpoint, up, started),
                              media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _relay(self, route: RouteState, endpoint: str, up: httpx.Response, started: float
                     ) -> AsyncIterator[bytes]:
        chunks = 0
        first = True
        code = 200
        try:
            async for raw in up.aiter_raw():
                if first:
                    self.metrics.ttft[route.model].observe(time.perf_counter() - started)
                    first = False
                chunks += raw.count(b"data: {")
                yield raw
        except httpx.TransportError as e:
            code = 502
            # The status line is gone already: say so in the stream, never end it silently.
            err = {"error": {"message": f"runtime for {route.model!r} failed mid-stream: "
                             f"{type(e).__name__}", "type": "server_error",
                             "code": "runtime_failed"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            # Each streamed data event carries one token (llama-cpp-python's server).
            self.metrics.count_tokens(route.model, 0, chunks)
            self.metrics.request(route.model, endpoint, code, time.perf_counter() - started)


class _Lease:
    """A held runtime slot, released exactly once whatever path the request takes."""

    def __init__(self, slot: asyncio.Semaphore) -> None:
        self.slot = slot
        self.handed_over = False
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.slot.release()


class _ClosingStream(StreamingResponse):
    """A streamed response that runs `on_close` when it ends, however it ends: normally, by
    error, or cancelled by a client that went away (even before the first byte)."""

    def __init__(self, on_close: Callable[[], Awaitable[None]], *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def create_app(table: RoutesTable) -> Starlette:
    gw = Gateway(table)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        timeout = httpx.Timeout(connect=2.0, read=None, write=30.0, pool=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            gw.client = client
            yield

    routes = [
        HttpRoute("/health", gw.health, methods=["GET"]),
        HttpRoute("/ready", gw.ready, methods=["GET"]),
        HttpRoute("/metrics", gw.metrics_text, methods=["GET"]),
        HttpRoute("/v1/models", gw.models, methods=["GET"]),
        *(HttpRoute(ep, gw.proxy, methods=["POST"]) for ep in ENDPOINT_ROLES),
    ]
    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no route {request.method} {request.url.path}",
                     "invalid_request_error", "not_found")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}",
                     "invalid_request_error", "method_not_allowed")

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: bad_method})
    app.state.gateway = gw
    return app

