"""The gateway's HTTP server: uvicorn, with the connection limits a slow client cannot outwait.

uvicorn holds a connection for as long as its client takes to send the request's headers: it
has no timeout for them, and its httptools parser no bound on their size. A slowloris (many
connections, each sending a header line now and then) would hold every connection the process
may open, and one client could stream headers without end. The protocol here adds both bounds,
and answers a connection beyond [serve] max_connections with a 503 in the API's error shape
(uvicorn's own `limit_concurrency` answers in plain text, uncounted).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sovctl.gateway.app import GatewayApp, Receive, Scope, Send, create_app, error
from sovctl.runtime.documents import Limits, RoutesTable

# Bytes a request's line and headers may take: far above what a client sends (a key, a
# content type, an SDK's few headers, a browser's cookies), far below what would cost memory.
MAX_HEAD_BYTES = 64 * 1024
# Seconds an idle connection is kept open between requests (uvicorn's default, said here).
KEEP_ALIVE_S = 5


def _raw_error(status: int, reason: bytes, message: str, code: str) -> bytes:
    """A whole HTTP response, for a connection the protocol answers and closes itself."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))


def guarded_protocol(limits: Limits, refuse: Callable[[str], None]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, bounded by `limits`; `refuse` counts what it turns away."""
    header_timeout = limits.header_timeout
    max_connections = limits.max_connections
    too_large = _raw_error(431, b"Request Header Fields Too Large",
                           f"request line and headers over {MAX_HEAD_BYTES} bytes",
                           "headers_too_large")
    too_slow = _raw_error(408, b"Request Timeout",
                          f"request headers not complete within {header_timeout:g}s "
                          "([serve] header_timeout)", "header_timeout")

    async def overloaded(scope: Scope, receive: Receive, send: Send) -> None:
        await error(503, f"the gateway holds its limit of {max_connections} connections "
                    "([serve] max_connections); retry shortly", "service_unavailable",
                    "too_many_connections",
                    headers={"Retry-After": "1", "Connection": "close"})(scope, receive, send)

    class GuardedHttpTools(HttpToolsProtocol):
        # The deadline for the headers of the request under way: armed when a connection
        # opens and when a kept-alive one begins its next request, off once they are in.
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            # Requests still running count too: a client that hung up leaves its task behind
            # for a while (uvicorn's limit_concurrency counts both, the same way).
            if len(self.connections) <= max_connections \
                    and len(self.tasks) < max_connections:
                super().on_headers_complete()
                return
            # uvicorn reads the application to run from self.app as it starts the request.
            refuse("connections")
            app, self.app = self.app, overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._close(too_large, "headers_too_large")

        def _arm(self) -> None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            # A connection that sent nothing (a browser's preconnect, say) is closed without
            # an answer; one that began a request is told why.
            self._close(too_slow if self._head_bytes else b"", "header_timeout")

        def _close(self, answer: bytes, reason: str) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            refuse(reason)
            if answer:
                self.transport.write(answer)
            self.transport.close()

    return GuardedHttpTools


def config(table: RoutesTable) -> uvicorn.Config:
    """The server for `table`: its address, its application, its limits."""
    app: GatewayApp = create_app(table)
    # Named, not "auto": without uvloop and httptools the gateway would silently be slower.
    # No proxy headers: clients reach the gateway directly, and it never uses their address.
    return uvicorn.Config(
        app, host=table.host, port=table.port, loop="uvloop",
        http=guarded_protocol(table.limits, app.gateway.metrics.refuse), lifespan="on",
        proxy_headers=False, log_level="warning", access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5)
