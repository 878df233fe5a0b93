"""What each request through the gateway used and cost: the tokens its answer reports, and
its record in the ledger.

Tokens come from the usage object of each answer. A stream reports usage only when asked
(`stream_options.include_usage`), so the gateway asks for it on every stream, reads it from the
stream's usage event, and passes that event on only to a client that asked for it itself.
A stream that ends without one (the client hung up, the stream broke off, a runtime that
reports none) is counted from what passed, and its record is marked estimated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sovctl.ledger.store import ESTIMATED, MEASURED, UNROUTED, Writer
from sovctl.runtime.documents import LOCAL, RoutesTable


def reported_usage(doc: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an answer's usage object; None when it has none."""
    u = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(u, dict):
        return None
    try:
        return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None


def ask_usage(payload: dict[str, Any]) -> bool:
    """Make a stream request report its usage; whether the client asked for that itself."""
    options = payload.get("stream_options")
    if not isinstance(options, dict):
        options = {}
    wanted = options.get("include_usage") is True
    payload["stream_options"] = {**options, "include_usage": True}
    return wanted


def answer_chars(doc: Any, part: str) -> int:
    """Characters an answer (`part` "message") or a stream event (`part` "delta") carries:
    its text, its reasoning and its tool calls' arguments, what a provider bills as generated
    tokens."""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    total = 0
    for choice in choices if isinstance(choices, list) else ():
        said = choice.get(part) if isinstance(choice, dict) else None
        if not isinstance(said, dict):
            continue
        texts = [said.get("content"), said.get("reasoning_content"), said.get("refusal")]
        calls = said.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts += [function.get("name"), function.get("arguments")]
        total += sum(len(t) for t in texts if isinstance(t, str))
    return total


class StreamTally:
    """Follows a server-sent event stream as it passes: counts its data events, reads the
    usage event, and holds that event back from a client that did not ask for it. With
    `count_text`, it also counts the characters the events carry (each event parsed: the
    frontier path only, where an estimate may have to stand for a bill)."""

    def __init__(self, keep_usage: bool, count_text: bool = False) -> None:
        self.keep_usage = keep_usage
        self.count_text = count_text
        self.events = 0
        self.chars = 0  # with count_text: the characters of text the events carried
        self.text_events = 0  # and the events that carried any
        self.usage: tuple[int, int] | None = None
        self._partial = b""  # an event whose end has not arrived yet

    def feed(self, data: bytes) -> bytes:
        """The bytes to pass on for `data`, as they arrive."""
        buffer = self._partial + data if self._partial else data
        cut = buffer.rfind(b"\n\n") + 2
        if cut == 1:  # no event ends here
            self._partial = buffer
            # Without the usage event to hold back, bytes pass as they come; with it, an
            # event waits for its end, as it may be the usage event.
            return data if self.keep_usage else b""
        complete, self._partial = buffer[:cut], buffer[cut:]
        self.events += complete.count(b"data: {")
        if self.count_text:
            for event in complete.split(b"\n\n"):
                chars = self._chars(event)
                self.chars += chars
                self.text_events += chars > 0
        if b'"usage"' not in complete:
            return data if self.keep_usage else complete
        kept = [e for e in complete.split(b"\n\n") if not self._is_usage(e)]
        return data if self.keep_usage else b"\n\n".join(kept)

    def end(self) -> bytes:
        """What is left to pass on when the stream ends."""
        rest, self._partial = self._partial, b""
        return b"" if self.keep_usage else rest

    @staticmethod
    def _chars(event: bytes) -> int:
        start = event.find(b"{")
        if start < 0:
            return 0
        try:
            return answer_chars(json.loads(event[start:]), "delta")
        except ValueError:
            return 0

    def _is_usage(self, event: bytes) -> bool:
        """Reads the usage of an event that has one; true when the event is only usage."""
        if b'"usage"' not in event:
            return False
        start = event.find(b"{")
        try:
            doc = json.loads(event[start:]) if start >= 0 else None
        except ValueError:
            return False
        found = reported_usage(doc)
        if found is None:
            return False
        self.usage = found
        return isinstance(doc, dict) and doc.get("choices") == []


class Ledger:
    """The gateway's side of the ledger: each request priced and queued for the writer thread,
    so recording costs the request path one queue put."""

    def __init__(self, table: RoutesTable) -> None:
        self.writer = (Writer(Path(table.ledger), table.ledger_max_rows) if table.ledger
                       else None)
        self.prices = {r.model: r.price for r in table.routes if r.kind == LOCAL}

    def local(self, model: str, endpoint: str, status: int, seconds: float, tokens_in: int,
              tokens_out: int, *, app: str, estimated: bool = False) -> None:
        """A request of `app` served, or refused, here; `model` "-" when it was never routed.
        `estimated`: the tokens were counted from the stream, not reported."""
        if self.writer is None:
            return
        tokens = ESTIMATED if estimated else MEASURED
        cost_source: str | None = tokens
        if model in self.prices:
            price = self.prices[model]
            route, cost = LOCAL, price.cost(tokens_in, tokens_out) if price else None
            if price is None:
                cost_source = None
            elif price.estimated:
                cost_source = ESTIMATED
        else:
            route, cost = UNROUTED, 0.0
        self.writer.put((time.time() - seconds, route, model, endpoint, status, tokens_in,
                         tokens_out, seconds, cost, tokens, cost_source, app))

    def routed(self, provider: str, model: str, endpoint: str, status: int, seconds: float,
               tokens_in: int, tokens_out: int, cost: float, *, app: str,
               estimated: bool = False) -> None:
        """A request of `app` routed to `provider`. `estimated`: the answer reported no
        usage; tokens and cost are estimates."""
        if self.writer is not None:
            source = ESTIMATED if estimated else MEASURED
            self.writer.put((time.time() - seconds, provider, model, endpoint, status,
                             tokens_in, tokens_out, seconds, cost, source, source, app))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
