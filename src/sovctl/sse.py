"""Reading an OpenAI-style server-sent event stream: the payload of each `data:` line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """Each event's data, in order, up to (not including) the closing `[DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield data
