"""Exception routing: a request that names model "frontier/NAME/MODEL" goes to provider NAME.

Nothing else ever leaves: every other model name is served locally or refused. A routed
request is sent as model MODEL on the surface it came in on, to a provider that speaks it
(its `kind`): an "openai" provider takes /v1/chat/completions (at base_url + /chat/completions)
and /v1/responses (base_url + /responses); an "anthropic" one /v1/messages and
/v1/messages/count_tokens (base_url + /v1/messages...). Another surface is a 400 naming the
ones it speaks. The key comes from the environment variable the provider's `api_key_env` names
(the gateway inherits `sovctl serve`'s environment; no file sovctl writes holds a key): as a
bearer token to OpenAI's kind, as `x-api-key` (with `anthropic-version`) to Anthropic's.
Policy, the same on every surface, in this order:
- a request marked `X-Sovctl-Private` (any value but 0/false/no) is never routed out: 403;
- MODEL must be one of the provider's `models`, each with its price: else 403, naming them;
- it may ask to generate at most the provider's `max_tokens` (400 beyond): `max_tokens` or
  `max_completion_tokens` on chat, `max_tokens` on messages, `max_output_tokens` on
  responses; one that asks for no limit gets that one;
- at most `max_concurrent` requests are in flight to a provider: beyond, 429;
- the `daily_cap` (money a UTC day) holds the day's spend (the ledger's, on a restart) plus a
  reservation for each request in flight: its worst case, the prompt's estimated tokens and
  all it may generate, at its model's prices. A request whose worst case does not fit gets a
  429, so requests in flight together cannot take the day past the cap (by more than the
  prompts' estimates fall short). When a request ends, its reservation gives way to its cost;
- a provider that cannot be reached gets its request a 502, fast: the connect, name lookup
  included, is bounded by CONNECT_TIMEOUT_S, so in a blackout it fails at once.
Tokens come from the usage each answer reports (a chat stream is asked for it; a Messages
stream has it in `message_start` and `message_delta`, a Responses one in `response.completed`),
priced at the model's prices. A count_tokens request generates nothing and costs nothing: it
reserves nothing against the cap and is recorded at 0. An answer without usage (the client
hung up mid-stream, which stops the generation; the stream broke off; a provider that reports
none) is still billed by the provider: it is recorded as an estimate, the prompt's estimated
tokens and the tokens of what was received, and counts towards the cap. A provider's error
message reaches the client with anything that looks like a credential replaced by [redacted],
in a whole answer or an error event within a stream (ErrorEvents). An app's
`frontier_daily_cap` is held as `daily_cap` is (DailyCap): a request reserves against both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from sovctl.errors import ConfigError
from sovctl.gateway import anthropic, responses
from sovctl.gateway.accounting import StreamTally, answer_chars, ask_usage, reported_usage
from sovctl.ledger.store import UNROUTED, spent_since
from sovctl.prices import Price
from sovctl.runtime.documents import FRONTIER_PREFIX, PROVIDER, Route

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENDPOINT = "/v1/chat/completions"
ANTHROPIC_VERSION = "2023-06-01"
PRIVATE_HEADER = b"x-sovctl-private"
NOT_PRIVATE = (b"0", b"false", b"no", b"")
CONNECT_TIMEOUT_S = 2.0
# A long answer may take minutes, but no provider goes this long between two bytes of it.
READ_TIMEOUT_S = 300.0
MAX_MESSAGE = 500
# Characters a token holds in English text, about, for the tokenizers of the big providers:
# how a prompt's tokens are estimated before it is sent, and a stream's when no usage came.
CHARS_PER_TOKEN = 4
# The request fields that bound how much it generates; OpenAI's newer models take only the
# second. A request with neither gets the first, the one every OpenAI-compatible API knows.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
CAP_RETRY_S = 5  # a request that waits on others' reservations: they end within seconds
BUSY_RETRY_S = 1
REDACTED = "[redacted]"
# Credentials by their shape: OpenAI and Anthropic (sk-ant-...) keys, masked ones too
# (sk-proj-****abcd), Hugging Face tokens, and the token after a Bearer scheme (RFC 6750).
_CREDENTIAL = re.compile(r"\bsk-[\w\-*.]{4,}|\bhf_\w{4,}|\b[Bb]earer\s+[\w\-.~+/]+=*")
# Long runs of token characters: a key of any other provider, when they look random.
_LONG_RUN = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")
MIN_KEY_CHARS = 8  # a configured key shorter than this is not searched for in a message
log = logging.getLogger("sovctl.gateway.frontier")
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                  (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def _messages_chars(doc: Any) -> int:
    """Characters a Messages answer generated: its text and its tool calls' input."""
    blocks = doc.get("content") if isinstance(doc, dict) else None
    total = 0
    for b in blocks if isinstance(blocks, list) else ():
        if isinstance(b, dict):
            said = b.get("text") or b.get("thinking")
            total += len(said) if isinstance(said, str) else len(json.dumps(b.get("input")))
    return total


def _responses_chars(doc: Any) -> int:
    """Characters a Responses answer generated: its messages' text and its calls' arguments."""
    output = doc.get("output") if isinstance(doc, dict) else None
    total = 0
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            total += len(item["arguments"])
        for part in item.get("content") or () if isinstance(item.get("content"), list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
    return total


def _delta_chars(doc: Any) -> int:
    """Characters a Messages or Responses stream event carries, generated."""
    if not isinstance(doc, dict):
        return 0
    delta = doc.get("delta")
    if isinstance(delta, str):  # Responses: output_text, function_call_arguments, reasoning
        return len(delta)
    if isinstance(delta, dict):  # Messages: text_delta, input_json_delta, thinking_delta
        said = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
        return len(said) if isinstance(said, str) else 0
    return 0


class EventTally(StreamTally):
    """Follows a Messages or Responses stream from a provider as it passes, unchanged: the
    characters it carries (for an estimate) and the usage of its `message_start` and
    `message_delta`, or of its `response.completed`."""

    def __init__(self) -> None:
        super().__init__(keep_usage=True, count_text=True)
        self.tokens_in = 0

    @staticmethod
    def _chars(event: bytes) -> int:
        start = event.find(b"{")
        try:
            return _delta_chars(json.loads(event[start:])) if start >= 0 else 0
        except ValueError:
            return 0

    def _is_usage(self, event: bytes) -> bool:
        start = event.find(b"{")
        try:
            doc = json.loads(event[start:]) if start >= 0 else None
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
        kind = doc.get("type")
        if kind == "message_start":
            found = anthropic.message_usage(doc.get("message"))
            self.tokens_in = found[0] if found else 0
        elif kind == "message_delta":
            found = anthropic.message_usage(doc)
            if found is not None:
                self.usage = (found[0] or self.tokens_in, found[1])
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            found = responses.usage(doc.get("response"))
            if found is not None:
                self.usage = found
        return False  # passed on as it came


def _openai_stream_error(err: dict[str, Any]) -> bytes:
    return f"data: {json.dumps({'error': err})}\n\n".encode()


def _responses_stream_error(err: dict[str, Any]) -> bytes:
    doc = {"type": "error", "code": err["code"], "message": err["message"], "param": None}
    return f"event: error\ndata: {json.dumps(doc)}\n\n".encode()


def _messages_stream_error(err: dict[str, Any]) -> bytes:
    return anthropic.stream_error(err["message"])


@dataclass(frozen=True)
class Way:
    """How the requests of one surface go to a provider, and how its answers are read."""

    path: str  # after the provider's base_url
    prompt_keys: tuple[str, ...]  # the fields that hold the prompt, for its estimate
    max_fields: tuple[str, ...]  # the fields that bound generation; the first applied if none
    usage: Callable[[Any], tuple[int, int] | None]  # (in, out) tokens of a whole answer
    chars: Callable[[Any], int]  # characters a whole answer generated, for an estimate
    stream_error: Callable[[dict[str, Any]], bytes]  # the event that ends a broken stream
    billed: bool = True  # count_tokens is not: it reserves and costs nothing


_MESSAGES_PROMPT = ("system", "messages", "tools")
# Each kind of provider: the surfaces it speaks, the first one the one to send instead.
SURFACES: dict[str, dict[str, Way]] = {
    "openai": {
        ENDPOINT: Way("/chat/completions", ("messages", "tools"), MAX_TOKENS_FIELDS,
                      reported_usage, lambda doc: answer_chars(doc, "message"),
                      _openai_stream_error),
        responses.RESPONSES: Way("/responses", ("instructions", "input", "tools"),
                                 ("max_output_tokens",), responses.usage, _responses_chars,
                                 _responses_stream_error),
    },
    "anthropic": {
        anthropic.MESSAGES: Way("/v1/messages", _MESSAGES_PROMPT, ("max_tokens",),
                                anthropic.message_usage, _messages_chars,
                                _messages_stream_error),
        anthropic.COUNT_TOKENS: Way("/v1/messages/count_tokens", _MESSAGES_PROMPT, (),
                                    lambda doc: None, lambda doc: 0, _messages_stream_error,
                                    billed=False),
    },
}


@dataclass(frozen=True)
class Refusal:
    """An answer the gateway gives instead of the provider's, in the OpenAI error shape."""

    status: int
    message: str
    type: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None


@dataclass(frozen=True)
class Outcome:
    route: str  # the provider's name; "-" when the name matched none
    status: int
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    refusal: Refusal | None = None  # still to be sent; None: the answer went out
    estimated: bool = False  # no usage came back: tokens and cost are estimates


@dataclass(frozen=True)
class Admission:
    """A request admitted to a provider, as it is sent."""

    price: Price  # its model's
    body: dict[str, Any]  # the client's, the provider's model name, its generation bounded
    prompt_tokens: int  # estimated from the prompt's size
    worst: float  # what it costs if it generates all it may: reserved while it is in flight
    way: Way = SURFACES["openai"][ENDPOINT]  # the surface it came in on
    bound: int = 0  # the most tokens it may generate


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


def _until_midnight() -> str:
    now = dt.datetime.now(dt.UTC)
    wait = _midnight(now.date() + dt.timedelta(days=1)) - now
    return str(int(wait.total_seconds()) + 1)


def prompt_tokens(body: Mapping[str, Any], keys: Sequence[str] = ("messages", "tools")) -> int:
    """The prompt's tokens, estimated from its characters (the messages and tools, or the
    surface's `keys`, as JSON, which overcounts the markup a little: an estimate that errs
    high reserves enough)."""
    text = json.dumps([body.get(k) for k in keys], ensure_ascii=False)
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def generated_tokens(chars: int, events: int = 0) -> int:
    """Tokens of what was received without a usage: a provider streams one token an event,
    or several, so the larger of the events and the characters' estimate."""
    return max(events, math.ceil(chars / CHARS_PER_TOKEN))


def _random_looking(run: str) -> bool:
    """Whether a long run of token characters reads as a secret: letters and digits mixed,
    with the spread of a random string (a long identifier or word has neither)."""
    if not (any(c.isdigit() for c in run) and any(c.isalpha() for c in run)):
        return False
    counts = Counter(run).values()
    entropy = -sum(n / len(run) * math.log2(n / len(run)) for n in counts)
    return entropy >= 3.5


def redact(text: str, key: str | None) -> str:
    """`text` with the configured key's value and anything shaped like a credential replaced
    by [redacted]: a provider's error may quote what it was sent."""
    if key and len(key) >= MIN_KEY_CHARS:
        text = text.replace(key, REDACTED)
    text = _CREDENTIAL.sub(REDACTED, text)
    return _LONG_RUN.sub(lambda m: REDACTED if _random_looking(m[0]) else m[0], text)


def _redact_strings(doc: Any, key: str | None) -> Any:
    if isinstance(doc, str):
        return redact(doc, key)
    if isinstance(doc, dict):
        return {k: _redact_strings(v, key) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_redact_strings(v, key) for v in doc]
    return doc


# An error event by its first line: OpenAI's `data: {"error": ...}` on chat, `event: error`
# on Messages (Anthropic) and Responses.
_ERROR_EVENT = re.compile(rb"event: ?error\r?\n|data: ?\{\s*\"error\"")
# How much of an event's start tells whether it is one: its first line, or this much of it.
_EVENT_HEAD = 64


class ErrorEvents:
    """Redacts, as [redacted], the credentials in the error events of a provider's stream,
    as a whole error answer's are. Bytes pass as they come: a chunk without "error" in it
    costs a search and the find of its last event's start; an event is held only while its
    start does not yet tell whether it is an error event (a chunk cut within its first
    line), and an error event until its end, then passed redacted."""

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.head = b""  # the held start of the current event
        self.error = False  # the current event is an error event: held to its end
        self.passing = False  # the current event is not one: its bytes pass
        self.newline = False  # the last chunk ended with a newline

    def feed(self, data: bytes) -> bytes:
        ended = b""
        if self.newline and data[:1] == b"\n":  # the blank line ending an event, cut in two
            ended, data = self._close() + b"\n", data[1:]
        self.newline = data.endswith(b"\n")
        return ended + self._feed(data)

    def _feed(self, data: bytes) -> bytes:
        if b"error" not in data and (self.passing or not self.head):
            # No error event begins or goes on here: only the last event's start may have
            # to wait, when too little of it came to tell.
            cut = data.rfind(b"\n\n") + 2
            tail = len(data) - cut if cut >= 2 else (0 if self.passing else len(data))
            if 0 < tail < _EVENT_HEAD and b"\n" not in data[-tail:]:
                self.head, self.passing = data[-tail:], False
                return data[:-tail]
            self.passing = (self.passing and cut < 2) or tail > 0
            return data
        return self._events(data)

    def _events(self, data: bytes) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(data):
            end = data.find(b"\n\n", pos)
            stop = len(data) if end < 0 else end + 2
            piece, pos = data[pos:stop], stop
            if self.passing:
                out += piece
            else:
                self.head += piece
                if not self.error and (b"\n" in self.head or len(self.head) >= _EVENT_HEAD):
                    self.error = _ERROR_EVENT.match(self.head) is not None
                    if not self.error:
                        out += self.head
                        self.head, self.passing = b"", True
            if end >= 0:  # the event ends here
                out += self._close()
        return bytes(out)

    def _close(self) -> bytes:
        """What is held of the event that ends, passed on; the next one begins."""
        held = self._redacted(self.head) if self.error else self.head
        self.head, self.error, self.passing = b"", False, False
        return held

    def end(self) -> bytes:
        """What is held when the stream ends (cut off within an event)."""
        return self._close()

    def _redacted(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data:"):
                text = line[5:].decode("utf-8", "replace").strip()
                try:
                    said = json.dumps(_redact_strings(json.loads(text), self.key))
                except ValueError:
                    said = redact(text, self.key)
                lines[i] = b"data: " + said.encode()
        return b"\n".join(lines)


@dataclass(frozen=True)
class Shortfall:
    """Why a request's worst case does not fit a daily cap now."""

    # "spent": nothing is left of it today; "over": the request may cost more than is left;
    # "reserved": more than the requests in flight leave of it (they end within seconds).
    reason: str
    cap: float
    spent: float
    reserved: float  # what the requests in flight hold
    holding: int  # the requests in flight that hold it


class DailyCap:
    """Money that may be spent a UTC day on frontier routes: the day's spend (the ledger's, on
    a restart) plus a reservation for each request in flight, its worst case. A provider's
    `daily_cap` is one, an app's `frontier_daily_cap` another; a request holds both, so
    neither can be passed by requests in flight together. `refuse` words the refusal of a
    request that does not fit, for whose cap it is. With no cap, the spend is only counted."""

    def __init__(self, cap: float | None, spent: float,
                 refuse: Callable[[Shortfall, Admission], Refusal]) -> None:
        self.cap = cap
        self.refuse = refuse
        self.day = _today()
        self.spent = spent
        self.reserved = 0.0
        self.holding = 0

    def spent_today(self) -> float:
        today = _today()
        if today != self.day:
            self.day, self.spent = today, 0.0
        return self.spent

    def shortfall(self, worst: float) -> Shortfall | None:
        """Why a request that may cost `worst` does not fit now; None when it does."""
        if self.cap is None:
            return None
        spent = self.spent_today()
        left = self.cap - spent
        reason = ("spent" if spent >= self.cap else "over" if worst > left
                  else "reserved" if worst > left - self.reserved else None)
        return (Shortfall(reason, self.cap, spent, self.reserved, self.holding)
                if reason is not None else None)

    def hold(self, worst: float) -> None:
        self.holding += 1
        self.reserved += worst

    def settle(self, worst: float, cost: float) -> None:
        """A request that held `worst` ended, having cost `cost` (0 when it failed unsent)."""
        self.holding -= 1
        # Back to an exact 0 when nothing is in flight: no rounding left over holds the cap.
        self.reserved = self.reserved - worst if self.holding else 0.0
        self.spent_today()
        self.spent += cost


class ProviderState:
    def __init__(self, route: Route, spent: float, environ: Mapping[str, str]) -> None:
        assert route.provider is not None
        provider = route.provider
        self.name = provider.name
        self.kind = provider.kind
        self.base = route.upstream
        parts = urlsplit(route.upstream)
        self.address = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self.models = provider.models
        self.max_concurrent = provider.max_concurrent
        self.max_tokens = provider.max_tokens
        self.key_env = provider.api_key_env
        self.key = environ.get(self.key_env) or None
        self.money = DailyCap(provider.daily_cap, spent, self._over_cap)
        self.in_flight = 0
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            # Only what is configured: no proxy or certificate setting from the environment
            # changes where a request goes.
            trust_env=False)

    @property
    def cap(self) -> float | None:
        return self.money.cap

    @property
    def reserved(self) -> float:
        """The worst cases of the requests in flight, held against the cap."""
        return self.money.reserved

    def _over_cap(self, short: Shortfall, a: Admission) -> Refusal:
        name, left = self.name, short.cap - short.spent
        if short.reason == "spent":
            return Refusal(429, f"provider {name}'s daily cap of {short.cap:g} is spent "
                           f"({short.spent:.4g}); requests resume at 00:00 UTC",
                           "rate_limit_exceeded", "daily_cap_reached",
                           {"Retry-After": _until_midnight()})
        if short.reason == "over":
            return Refusal(429, f"this request may cost up to {a.worst:.4g} (about "
                           f"{a.prompt_tokens} prompt tokens and {a.bound} generated, at "
                           f"{a.body['model']}'s prices), more than the {left:.4g} left of "
                           f"provider {name}'s daily cap of {short.cap:g}: ask for fewer "
                           "max_tokens, or wait for 00:00 UTC", "rate_limit_exceeded",
                           "daily_cap_reached", {"Retry-After": _until_midnight()})
        return Refusal(429, f"the {short.holding} requests in flight to provider {name} hold "
                       f"{short.reserved:.4g} of the {left:.4g} left of its daily cap; this "
                       f"one may cost up to {a.worst:.4g}: retry when they end",
                       "rate_limit_exceeded", "daily_cap_reserved",
                       {"Retry-After": str(CAP_RETRY_S)})

    def headers(self, stream: bool) -> dict[str, str]:
        assert self.key is not None
        auth = ({"x-api-key": self.key, "anthropic-version": ANTHROPIC_VERSION}
                if self.kind == "anthropic" else {"authorization": f"Bearer {self.key}"})
        return {**auth, "content-type": "application/json",
                "accept": "text/event-stream" if stream else "application/json",
                # A stream must pass as it comes, not wait on a decompressor's buffer.
                "accept-encoding": "identity"}

    def speaks(self) -> str:
        return ", ".join(SURFACES.get(self.kind, {}))

    def allowed(self) -> str:
        return ", ".join(f"{FRONTIER_PREFIX}{self.name}/{m}" for m in self.models)


def _private(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name == PRIVATE_HEADER and value.strip().lower() not in NOT_PRIVATE
               for name, value in headers)


def _their_message(content: bytes, key: str | None) -> str:
    """The provider's own error message, short, on one line and with no credential in it,
    or nothing."""
    try:
        doc = json.loads(content)
    except ValueError:
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    if not isinstance(msg, str):
        return ""
    # Redacted before it is cut: a key cut in two would no longer be recognised.
    return redact(" ".join(msg.split()), key)[:MAX_MESSAGE]


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
                headers: dict[str, str] | None = None, param: str | None = None) -> Outcome:
        return Outcome(route, status, refusal=Refusal(status, message, etype, code,
                                                      headers or {}, param))

    def _check(self, endpoint: str, model: str, payload: Mapping[str, Any],
               headers: Sequence[tuple[bytes, bytes]], caps: Sequence[DailyCap]
               ) -> tuple[ProviderState, Admission] | Outcome:
        name, _, upstream_model = model.removeprefix(FRONTIER_PREFIX).partition("/")
        p = self.providers.get(name)
        if p is None:
            known = ", ".join(sorted(self.providers)) or "none is configured"
            return self._refuse(UNROUTED, 404, f"no provider {name!r} for model {model!r}; "
                                f"providers: {known} ([providers.NAME] in sovctl.toml)",
                                "invalid_request_error", "provider_not_found")
        if not upstream_model:
            return self._refuse(p.name, 400, f"model {model!r} names no model of {name}: "
                                f"use one of {p.allowed()}", "invalid_request_error",
                                "model_not_found", param="model")
        way = SURFACES.get(p.kind, {}).get(endpoint)
        if way is None:
            return self._refuse(p.name, 400, f"provider {name} (kind = \"{p.kind}\") speaks "
                                f"{p.speaks()}, not {endpoint}: send the request there, or "
                                f"name a provider that speaks {endpoint}",
                                "invalid_request_error", "endpoint_not_routed", param="model")
        if _private(headers):
            return self._refuse(p.name, 403, f"the request is marked private "
                                f"(X-Sovctl-Private), and {model!r} would leave this machine: "
                                f"it is never routed out", "permission_denied",
                                "private_request")
        price = p.models.get(upstream_model)
        if price is None:
            return self._refuse(p.name, 403, f"model {upstream_model!r} is not one of provider "
                                f"{name}'s models; allowed: {p.allowed()} "
                                f"([providers.{name}.models] in sovctl.toml)",
                                "permission_denied", "model_not_allowed", param="model")
        body = {**payload, "model": upstream_model}
        asked = {k: v for k in way.max_fields if isinstance(v := body.get(k), int)}
        for k, v in asked.items():
            if v > p.max_tokens:
                return self._refuse(p.name, 400, f"{k} {v} is above provider {name}'s limit "
                                    f"of {p.max_tokens} (providers.{name}.max_tokens)",
                                    "invalid_request_error", "max_tokens_above_limit", param=k)
        if not asked and way.max_fields:
            body[way.max_fields[0]] = p.max_tokens
        prompt = prompt_tokens(body, way.prompt_keys)
        bound = min(asked.values(), default=p.max_tokens) if way.billed else 0
        worst = price.cost(prompt, bound) if way.billed else 0.0
        if p.key is None:
            return self._refuse(p.name, 503, f"provider {name} has no key: ${p.key_env} is not "
                                "set in the environment of 'sovctl serve'", "service_unavailable",
                                "provider_key_missing")
        if p.in_flight >= p.max_concurrent:
            return self._refuse(p.name, 429, f"provider {name} has {p.in_flight} requests in "
                                f"flight, its limit (providers.{name}.max_concurrent)",
                                "rate_limit_exceeded", "provider_busy",
                                {"Retry-After": str(BUSY_RETRY_S)})
        admitted = Admission(price, body, prompt, worst, way, bound)
        for cap in (p.money, *caps) if way.billed else ():
            short = cap.shortfall(worst)
            if short is not None:
                refusal = cap.refuse(short, admitted)
                return Outcome(p.name, refusal.status, refusal=refusal)
        return p, admitted

    async def serve(self, endpoint: str, model: str, payload: dict[str, Any],
                    headers: Sequence[tuple[bytes, bytes]], receive: Receive, send: Send,
                    caps: Sequence[DailyCap] = ()) -> Outcome:
        """The request sent to its provider, or refused. Its worst case is reserved against
        the provider's daily cap and `caps` (its app's), and settled when it ends."""
        checked = self._check(endpoint, model, payload, headers, caps)
        if isinstance(checked, Outcome):
            return checked
        p, admitted = checked
        held = (p.money, *caps) if admitted.way.billed else ()
        # Admitted and reserved with no await in between: concurrent requests see each other.
        p.in_flight += 1
        for cap in held:
            cap.hold(admitted.worst)
        cost = 0.0  # an exception (the task cancelled) leaves no answer to bill
        try:
            out = await self._send(p, admitted, receive, send)
            cost = out.cost
            return out
        finally:
            p.in_flight -= 1
            for cap in held:
                cap.settle(admitted.worst, cost)

    async def _send(self, p: ProviderState, a: Admission, receive: Receive, send: Send
                    ) -> Outcome:
        stream = bool(a.body.get("stream"))
        # Only a chat stream is asked for its usage; the others report it unasked.
        keep_usage = ask_usage(a.body) if stream and a.way.path == "/chat/completions" else True
        request = p.client.build_request("POST", p.base + a.way.path,
                                         content=json.dumps(a.body).encode(),
                                         headers=p.headers(stream))
        try:
            response = await p.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            return self._unreachable(p, type(e).__name__)  # nothing was sent: nothing billed
        except httpx.HTTPError as e:
            # Sent, and no answer: the provider may bill the prompt at least.
            why = ("no answer in time" if isinstance(e, httpx.TimeoutException)
                   else "no answer") + f" ({type(e).__name__})"
            return self._billed(self._unreachable(p, why), a, 0)
        try:
            if not 200 <= response.status_code < 300:
                return self._their_error(p, response.status_code, response.headers,
                                         await response.aread())
            if stream:
                return await self._stream(p, a, response, keep_usage, receive, send)
            content = await response.aread()
        except httpx.HTTPError as e:
            return self._billed(self._unreachable(
                p, f"the answer broke off ({type(e).__name__})"), a, 0)
        finally:
            await response.aclose()
        try:
            doc = json.loads(content)
        except ValueError:
            doc = None
        usage = a.way.usage(doc)
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(b"content-type", response.headers.get(
                        "content-type", "application/json").encode("latin-1")),
                        (b"content-length", b"%d" % len(content))]})
        await send({"type": "http.response.body", "body": content})
        out = Outcome(p.name, response.status_code)
        if not a.way.billed:
            return out
        if usage is None:
            return self._billed(out, a, generated_tokens(a.way.chars(doc)))
        return dataclasses.replace(out, tokens_in=usage[0], tokens_out=usage[1],
                                   cost=a.price.cost(*usage))

    @staticmethod
    def _billed(out: Outcome, a: Admission, generated: int) -> Outcome:
        """`out` with an estimate of what the provider bills for a request whose answer
        reported no usage: the prompt's estimated tokens and `generated`."""
        return dataclasses.replace(out, tokens_in=a.prompt_tokens, tokens_out=generated,
                                   cost=a.price.cost(a.prompt_tokens, generated),
                                   estimated=True)

    def _unreachable(self, p: ProviderState, why: str) -> Outcome:
        return self._refuse(p.name, 502, f"provider {p.name} ({p.address}) is unreachable: "
                            f"{why}; local models are not affected", "server_error",
                            "provider_unreachable")

    def _their_error(self, p: ProviderState, status: int, headers: httpx.Headers,
                     content: bytes) -> Outcome:
        theirs = _their_message(content, p.key)
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

    async def _stream(self, p: ProviderState, a: Admission, response: httpx.Response,
                      keep_usage: bool, receive: Receive, send: Send) -> Outcome:
        tally = (StreamTally(keep_usage, count_text=True) if a.way.path == "/chat/completions"
                 else EventTally())
        errors = ErrorEvents(p.key)
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        status = 200

        async def pump() -> None:
            nonlocal status
            try:
                async for data in response.aiter_bytes():
                    out = errors.feed(tally.feed(data))
                    if out:
                        await send({"type": "http.response.body", "body": out,
                                    "more_body": True})
                rest = errors.feed(tally.end()) + errors.end()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            except httpx.HTTPError as e:
                status = 502
                # The status line is gone already: say so in the stream, never end it silently.
                err = {"message": f"provider {p.name} failed mid-stream: "
                       f"{type(e).__name__}", "type": "server_error", "code": "provider_failed"}
                await send({"type": "http.response.body", "more_body": True,
                            "body": a.way.stream_error(err)})
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
        # 499: the client hung up mid-stream (nginx's code; HTTP has none).
        out = Outcome(p.name, 499 if gone else status)
        if tally.usage is None:
            return self._billed(out, a, generated_tokens(tally.chars, tally.text_events))
        return dataclasses.replace(out, tokens_in=tally.usage[0], tokens_out=tally.usage[1],
                                   cost=a.price.cost(*tally.usage))
