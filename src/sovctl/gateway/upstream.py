"""The gateway's HTTP/1.1 client to its runtimes: kept-alive connections to each one, the
answer parsed with httptools as it arrives. Starlette's and httpx's objects cost over a
millisecond of CPU a request, as much as a small embedding takes; this costs about 0.1 ms.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import cast
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    """A runtime that did not answer, or broke its answer off."""


# A runtime closes a kept-alive connection idle for 5 s (llama-server's keep-alive timeout):
# one idle for less than this is still open when the request reaches it.
IDLE_REUSE_S = 2.0
CONNECT_TIMEOUT_S = 2.0
# A runtime's /props answer is read from memory: one that takes longer is stuck.
PROPS_TIMEOUT_S = 5.0


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to a runtime, carrying one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.content_type = b"application/json"
        self.head_done = False
        self.framed = False  # a length or chunked encoding: the end is not the connection's
        self.complete = False
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.error: UpstreamError | None = None

    def send(self, data: list[bytes]) -> None:
        assert self.transport is not None
        self._begin()
        self.transport.writelines(data)

    def reusable(self) -> bool:
        return (not self.closed and self.keep_alive
                and time.monotonic() - self.idle_since < IDLE_REUSE_S)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- reading the answer, for the request's task -------------------------------------------
    async def head(self) -> int:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.status

    async def chunk(self) -> bytes:
        """The body's next bytes as they arrive; b"" at its end."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        return data

    async def body(self) -> bytes:
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait()
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The request goes out in one write, but an answer must not wait on Nagle either.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = UpstreamError(f"a malformed answer ({type(e).__name__})")
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.framed and not self.complete:
            self.complete = True  # a body that ends with the connection
        elif not self.complete and self.error is None:
            self.error = UpstreamError("closed the connection" if exc is None
                                       else type(exc).__name__)
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()


class Upstream:
    """Kept-alive connections to one runtime, the most recently used reused first."""

    def __init__(self, url: str, key: str | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/").encode()
        self.headers = (f"host: {parts.netloc}\r\ncontent-type: application/json\r\n"
                        + (f"authorization: Bearer {key}\r\n" if key else "")).encode()
        self.idle: list[Connection] = []

    async def request(self, method: bytes, path: str, body: bytes = b"") -> Connection:
        """Sends the request; the answer is read from the connection returned, which goes back
        with release() or, when its answer was not read to the end, close()."""
        conn: Connection | None = None
        while self.idle:
            candidate = self.idle.pop()
            if candidate.reusable():
                conn = candidate
                break
            candidate.close()
        if conn is None:
            fresh = conn = Connection()
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await loop.create_connection(lambda: fresh, self.host, self.port)
            except (OSError, TimeoutError) as e:
                raise UpstreamError(type(e).__name__) from e
        conn.send([method, b" ", self.prefix, path.encode(), b" HTTP/1.1\r\n", self.headers,
                   b"content-length: %d\r\n\r\n" % len(body), body])
        return conn

    def release(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        if conn.complete and conn.reusable():
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
