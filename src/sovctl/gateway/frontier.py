"""Exception routing: a request that names model "frontier/NAME/MODEL" goes to provider NAME.

Nothing else ever leaves: every other model name is served locally or refused. A routed
request is sent to the provider's base_url + /chat/completions as model MODEL, with the key
from the environment variable the provider's `api_key_env` names (the gateway inherits
`sovctl serve`'s environment; no file sovctl writes holds a key). Policy, in this order:
- a request marked `X-Sovctl-Private` (any value but 0/false/no) is never routed out: 403;
- once a provider's `daily_cap` is spent (by the ledger's costs, UTC day), 429 until midnight;
- a provider that cannot be reached gets its request a 502, fast: the connect, name lookup
  included, is bounded by CONNECT_TIMEOUT_S, so in a blackout it fails at once.
Tokens come from the usage each answer reports (a stream is asked for it), priced at the
provider's prices; the spend counts towards the cap as soon as the answer ends. The cap is
checked before a request is sent, so requests in flight when it is reached may end above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from sovctl.errors import ConfigError
from sovctl.gateway.accounting import StreamTally, ask_usage, reported_usage
from sovctl.ledger.store import UNROUTED, spent_since
from sovctl.runtime.documents import FRONTIER_PREFIX, PROVIDER, Route

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENDPOINT = "/v1/chat/completions"
PRIVATE_HEADER = b"x-sovctl-private"
NOT_PRIVATE = (b"0", b"false", b"no", b"")
CONNECT_TIMEOUT_S = 2.0
# A long answer may take minutes, but no provider goes this long between two bytes of it.
READ_TIMEOUT_S = 300.0
MAX_MESSAGE = 500
log = logging.getLogger("sovctl.gateway.frontier")
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                  (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@dataclass(frozen=True)
class Refusal:
    """An answer the gateway gives instead of the provider's, in the OpenAI error shape."""

    status: int
    message: str
    type: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    route: str  # the provider's name; "-" when the name matched none
    status: int
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    refusal: Refusal | None = None  # still to be sent; None: the answer went out


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


class ProviderState:
    def __init__(self, route: Route, spent: float, environ: Mapping[str, str]) -> None:
        assert route.provider is not None and route.price is not None
        self.name = route.provider.name
        self.url = route.upstream + "/chat/completions"
        parts = urlsplit(route.upstream)
        self.address = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self.price = route.price
        self.cap = route.provider.daily_cap
        self.key_env = route.provider.api_key_env
        self.key = environ.get(self.key_env) or None
        self.day = _today()
        self.spent = spent
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            # Only what is configured: no proxy or certificate setting from the environment
            # changes where a request goes.
            trust_env=False)

    def spent_today(self) -> float:
        today = _today()
        if today != self.day:
            self.day, self.spent = today, 0.0
        return self.spent

    def charge(self, cost: float) -> None:
        self.spent_today()
        self.spent += cost

    def headers(self, stream: bool) -> dict[str, str]:
        assert self.key is not None
        return {"authorization": f"Bearer {self.key}", "content-type": "application/json",
                "accept": "text/event-stream" if stream else "application/json",
                # A stream must pass as it comes, not wait on a decompressor's buffer.
                "accept-encoding": "identity"}


def _private(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name == PRIVATE_HEADER and value.strip().lower() not in NOT_PRIVATE
               for name, value in headers)


def _their_message(content: bytes) -> str:
    """The provider's own error message, short and on one line, or nothing."""
    try:
        doc = json.loads(content)
    except ValueError:
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    if not isinstance(msg, str):
        return ""
    return " ".join(msg.split())[:MAX_MESSAGE]


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Frontier:
    """The provider routes of the routing table, their caps and their HTTP clients."""

    def __init__(self, routes: Sequence[Route], ledger: str,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        providers = [r for r in routes if r.kind == PROVIDER]
        today = _midnight(_today()).timestamp()
        spent: dict[str, float] = {}
        if ledger and providers:
            # A restarted gateway keeps counting the day's spend where the ledger left it.
            try:
                spent = spent_since(Path(ledger), today)
            except (ConfigError, sqlite3.Error) as e:
                log.warning("today's provider spend not read from %s, caps count from 0: %s",
                            ledger, e)
        self.providers = {
            r.provider.name: ProviderState(r, spent.get(r.provider.name, 0.0), env)
            for r in providers if r.provider is not None}

    async def aclose(self) -> None:
        for p in self.providers.values():
            await p.client.aclose()

    def _refuse(self, route: str, status: int, message: str, etype: str, code: str,
                headers: dict[str, str] | None = None) -> Outcome:
        return Outcome(route, status, refusal=Refusal(status, message, etype, code,
                                                      headers or {}))

    def _check(self, endpoint: str, model: str, headers: Sequence[tuple[bytes, bytes]]
               ) -> tuple[ProviderState, str] | Outcome:
        name, _, upstream_model = model.removeprefix(FRONTIER_PREFIX).partition("/")
        p = self.providers.get(name)
        if p is None:
            known = ", ".join(sorted(self.providers)) or "none is configured"
            return self._refuse(UNROUTED, 404, f"no provider {name!r} for model {model!r}; "
                                f"providers: {known} ([providers.NAME] in sovctl.toml)",
                                "invalid_request_error", "provider_not_found")
        if not upstream_model:
            return self._refuse(p.name, 400, f"model {model!r} names no model of {name}: "
                                f"use frontier/{name}/MODEL", "invalid_request_error",
                                "model_not_found")
        if endpoint != ENDPOINT:
            return self._refuse(p.name, 400, f"a frontier route serves {ENDPOINT} only, not "
                                f"{endpoint}", "invalid_request_error", "endpoint_not_routed")
        if _private(headers):
            return self._refuse(p.name, 403, f"the request is marked private "
                                f"(X-Sovctl-Private), and {model!r} would leave this machine: "
                                f"it is never routed out", "permission_denied",
                                "private_request")
        if p.cap is not None and p.spent_today() >= p.cap:
            now = dt.datetime.now(dt.UTC)
            wait = _midnight(now.date() + dt.timedelta(days=1)) - now
            return self._refuse(p.name, 429, f"provider {name}'s daily cap of {p.cap:g} is "
                                f"spent ({p.spent:.4g}); requests resume at 00:00 UTC",
                                "rate_limit_exceeded", "daily_cap_reached",
                                {"Retry-After": str(int(wait.total_seconds()) + 1)})
        if p.key is None:
            return self._refuse(p.name, 503, f"provider {name} has no key: ${p.key_env} is not "
                                "set in the environment of 'sovctl serve'", "service_unavailable",
                                "provider_key_missing")
        return p, upstream_model

    async def serve(self, endpoint: str, model: str, payload: dict[str, Any],
                    headers: Sequence[tuple[bytes, bytes]], receive: Receive, send: Send
                    ) -> Outcome:
        checked = self._check(endpoint, model, headers)
        if isinstance(checked, Outcome):
            return checked
        p, upstream_model = checked
        body = {**payload, "model": upstream_model}
        stream = bool(body.get("stream"))
        keep_usage = ask_usage(body) if stream else True
        request = p.client.build_request("POST", p.url, content=json.dumps(body).encode(),
                                         headers=p.headers(stream))
        try:
            response = await p.client.send(request, stream=True)
        except httpx.TimeoutException as e:
            return self._unreachable(p, f"no answer in time ({type(e).__name__})")
        except httpx.HTTPError as e:
            return self._unreachable(p, type(e).__name__)
        try:
            if not 200 <= response.status_code < 300:
                return self._their_error(p, response.status_code, response.headers,
                                         await response.aread())
            if stream:
                return await self._stream(p, response, keep_usage, receive, send)
            content = await response.aread()
        except httpx.HTTPError as e:
            return self._unreachable(p, f"the answer broke off ({type(e).__name__})")
        finally:
            await response.aclose()
        try:
            tokens = reported_usage(json.loads(content)) or (0, 0)
        except ValueError:
            tokens = (0, 0)
        cost = p.price.cost(*tokens)
        p.charge(cost)
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(b"content-type", response.headers.get(
                        "content-type", "application/json").encode("latin-1")),
                        (b"content-length", b"%d" % len(content))]})
        await send({"type": "http.response.body", "body": content})
        return Outcome(p.name, response.status_code, *tokens, cost)

    def _unreachable(self, p: ProviderState, why: str) -> Outcome:
        return self._refuse(p.name, 502, f"provider {p.name} ({p.address}) is unreachable: "
                            f"{why}; local models are not affected", "server_error",
                            "provider_unreachable")

    def _their_error(self, p: ProviderState, status: int, headers: httpx.Headers,
                     content: bytes) -> Outcome:
        theirs = _their_message(content)
        said = f": {theirs}" if theirs else ""
        if status in (401, 403):
            # The client's key is the gateway's, not this one: a 401 would send it looking
            # at the wrong key.
            return self._refuse(p.name, 502, f"provider {p.name} refused the key in "
                                f"${p.key_env} (HTTP {status}){said}", "server_error",
                                "provider_auth_failed")
        if status >= 500:
            return self._refuse(p.name, 502, f"provider {p.name} failed (HTTP {status}){said}",
                                "server_error", "provider_failed")
        retry = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else {}
        return self._refuse(p.name, status, f"provider {p.name} rejected the request "
                            f"(HTTP {status}){said}", "invalid_request_error"
                            if status != 429 else "rate_limit_exceeded",
                            "provider_rejected", retry)

    async def _stream(self, p: ProviderState, response: httpx.Response, keep_usage: bool,
                      receive: Receive, send: Send) -> Outcome:
        tally = StreamTally(keep_usage)
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        status = 200

        async def pump() -> None:
            nonlocal status
            try:
                async for data in response.aiter_bytes():
                    out = tally.feed(data)
                    if out:
                        await send({"type": "http.response.body", "body": out,
                                    "more_body": True})
                rest = tally.end()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            except httpx.HTTPError as e:
                status = 502
                # The status line is gone already: say so in the stream, never end it silently.
                err = {"error": {"message": f"provider {p.name} failed mid-stream: "
                                 f"{type(e).__name__}", "type": "server_error",
                                 "code": "provider_failed"}}
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"data: {json.dumps(err)}\n\n".encode()})
            await send({"type": "http.response.body", "body": b""})

        # A client that hangs up stops the generation, which the provider would bill for.
        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not pumping.done():
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
        gone = pumping.cancelled()
        if not gone:
            pumping.result()
        tokens = tally.usage or (0, 0)
        cost = p.price.cost(*tokens)
        p.charge(cost)
        # 499: the client hung up mid-stream (nginx's code; HTTP has none).
        return Outcome(p.name, 499 if gone else status, *tokens, cost)
