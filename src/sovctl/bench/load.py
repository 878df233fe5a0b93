"""`sovctl bench serve`: load an OpenAI-compatible endpoint and measure what clients see.

For each concurrency level, `requests` streaming requests are sent by that many worker
threads (each sends its next request as soon as the previous one finishes). Per request:
- time to first token (TTFT): from sending the request to the first streamed content;
- inter-token latency (ITL): the gaps between successive streamed content chunks;
- end-to-end latency: from sending to the end of the stream.
Per level: those three as mean, median, p95 and p99; output tokens/s (all output tokens over
the level's wall time); requests/s; and errors. Output tokens are the server's
usage.completion_tokens where the stream reports it, otherwise the number of content chunks.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sovctl.bench.stats import Summary, summarise
from sovctl.errors import NetworkError, NotFoundError, UsageError
from sovctl.result import utcnow
from sovctl.sse import sse_data

# Common words that nearly every tokenizer keeps as one token each, after a space.
_WORDS = ("the", "cat", "sat", "on", "a", "red", "mat", "and", "the", "dog", "ran", "to", "it")


def make_prompt(tokens: int) -> str:
    """A prompt of roughly `tokens` tokens (one common word per token)."""
    words = [_WORDS[i % len(_WORDS)] for i in range(max(tokens, 1))]
    return " ".join(words)


@dataclass(frozen=True)
class LoadSettings:
    url: str
    model: str | None
    concurrency: tuple[int, ...]
    requests: int
    prompt_tokens: int
    max_tokens: int
    endpoint: str  # "chat" | "completions"
    timeout: float
    ignore_eos: bool
    warmup: bool

    def check(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise UsageError("--concurrency takes levels of 1 or more, e.g. 1,4,8")
        if self.requests < 1 or self.prompt_tokens < 1 or self.max_tokens < 1:
            raise UsageError("--requests, --prompt-tokens and --max-tokens must be at least 1")
        if self.endpoint not in ("chat", "completions"):
            raise UsageError(f"--endpoint must be chat or completions, got {self.endpoint!r}")
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"--url must be an http(s) base URL, got {self.url!r}",
                             hint="e.g. http://127.0.0.1:8088/v1")


@dataclass(frozen=True)
class RequestOutcome:
    ok: bool
    error: str
    ttft: float | None
    e2e: float
    gaps: tuple[float, ...]
    output_tokens: int
    tokens_from_usage: bool
    prompt_tokens: int | None


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    completed: int
    errors: int
    error_samples: tuple[str, ...]
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens_reported: int | None  # from usage, when the server sends it
    tokens_counted_from: str  # "usage" | "chunks" | "mixed"
    ttft: Summary | None
    itl: Summary | None
    e2e: Summary | None


@dataclass(frozen=True)
class LoadRun:
    kind: str
    started_at: str
    finished_at: str
    url: str
    model: str
    runtime: str | None  # which engine served, as a sovctl gateway reports it; None elsewhere
    settings: LoadSettings
    levels: tuple[LevelResult, ...]

    @property
    def errors(self) -> int:
        return sum(level.errors for level in self.levels)

    def rows(self) -> tuple[LevelRow, ...]:
        """The run flattened for CSV and Markdown: one row per concurrency level."""
        return tuple(LevelRow.of(self.url, self.model, lv) for lv in self.levels)


@dataclass(frozen=True)
class LevelRow:
    """One concurrency level, flat, latencies in milliseconds; the field names are the CSV
    columns. A latency is None when no request of the level produced it."""

    url: str
    model: str
    concurrency: int
    requests: int
    completed: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    tokens_counted_from: str
    ttft_mean_ms: float | None
    ttft_median_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    itl_mean_ms: float | None
    itl_median_ms: float | None
    itl_p95_ms: float | None
    itl_p99_ms: float | None
    e2e_mean_ms: float | None
    e2e_median_ms: float | None
    e2e_p95_ms: float | None
    e2e_p99_ms: float | None

    @classmethod
    def of(cls, url: str, model: str, lv: LevelResult) -> LevelRow:
        latencies = {
            f"{metric}_{q}_ms": getattr(summ, q) * 1000 if summ else None
            for metric, summ in (("ttft", lv.ttft), ("itl", lv.itl), ("e2e", lv.e2e))
            for q in ("mean", "median", "p95", "p99")
        }
        return cls(
            url=url, model=model, concurrency=lv.concurrency, requests=lv.requests,
            completed=lv.completed, errors=lv.errors, wall_s=lv.wall_s,
            requests_per_s=lv.requests_per_s, output_tokens=lv.output_tokens,
            output_tokens_per_s=lv.output_tokens_per_s,
            tokens_counted_from=lv.tokens_counted_from, **latencies,
        )


class _Client:
    def __init__(self, s: LoadSettings, api_key: str | None, max_conn: int) -> None:
        import httpx

        self.httpx = httpx
        self.s = s
        self.base = s.url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(s.timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn),
        )

    def close(self) -> None:
        self.http.close()

    def models(self) -> dict[str, str | None]:
        """Served model ids, each with the runtime a sovctl gateway names for it."""
        httpx = self.httpx
        try:
            r = self.http.get(f"{self.base}/models")
        except httpx.TransportError as e:
            raise NetworkError(
                f"cannot reach {self.base}: {e}",
                hint="start the gateway with 'sovctl serve', or point --url at a running server",
            ) from None
        if r.status_code in (401, 403):
            raise NetworkError(f"{self.base} refused the API key (HTTP {r.status_code})",
                               hint="pass the right key with --api-key")
        if r.status_code != 200:
            raise NetworkError(f"GET {self.base}/models answered HTTP {r.status_code}",
                               hint="is --url the OpenAI-compatible base, ending in /v1?")
        try:
            return {m["id"]: m.get("runtime") for m in r.json().get("data", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise NetworkError(f"GET {self.base}/models did not answer an OpenAI model list",
                               hint="is --url the OpenAI-compatible base, ending in /v1?") from None

    def body(self, model: str, prompt: str) -> tuple[str, dict[str, Any]]:
        s = self.s
        body: dict[str, Any] = {
            "model": model, "max_tokens": s.max_tokens, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True},
        }
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            return f"{self.base}/chat/completions", body
        body["prompt"] = prompt
        return f"{self.base}/completions", body

    def one(self, model: str, prompt: str) -> RequestOutcome:
        httpx = self.httpx
        url, body = self.body(model, prompt)
        t0 = time.perf_counter()
        times: list[float] = []
        usage_out: int | None = None
        usage_in: int | None = None

        def failed(msg: str) -> RequestOutcome:
            return RequestOutcome(False, msg, None, time.perf_counter() - t0, (), 0, False, None)

        try:
            with self.http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    detail = r.read().decode(errors="replace")[:200]
                    return failed(f"HTTP {r.status_code}: {detail}")
                for data in sse_data(r.iter_lines()):
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        return failed(f"not JSON in the stream: {data[:80]!r}")
                    if chunk.get("error"):
                        return failed(f"error in the stream: {str(chunk['error'])[:200]}")
                    if _content(chunk, self.s.endpoint):
                        times.append(time.perf_counter())
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        usage_out = int(usage["completion_tokens"])
                        usage_in = usage.get("prompt_tokens")
        except httpx.HTTPError as e:
            return failed(f"{type(e).__name__}: {e}")
        end = time.perf_counter()
        if not times and not usage_out:
            return failed("the stream carried no output")
        return RequestOutcome(
            ok=True, error="", ttft=(times[0] - t0) if times else None, e2e=end - t0,
            gaps=tuple(b - a for a, b in itertools.pairwise(times)),
            output_tokens=usage_out if usage_out is not None else len(times),
            tokens_from_usage=usage_out is not None,
            prompt_tokens=int(usage_in) if usage_in is not None else None,
        )


def _content(chunk: dict[str, Any], endpoint: str) -> bool:
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                return True
        elif choice.get("text"):
            return True
    return False


def _level(client: _Client, model: str, prompt: str, concurrency: int,
           requests: int) -> LevelResult:
    outcomes: list[RequestOutcome] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            out = client.one(model, prompt)
            with lock:
                outcomes.append(out)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    ok = [o for o in outcomes if o.ok]
    bad = [o for o in outcomes if not o.ok]
    tokens = sum(o.output_tokens for o in ok)
    from_usage = {o.tokens_from_usage for o in ok}
    prompts = [o.prompt_tokens for o in ok if o.prompt_tokens is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        completed=len(ok),
        errors=len(bad),
        error_samples=tuple(dict.fromkeys(o.error for o in bad))[:5],
        wall_s=wall,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall if wall > 0 else 0.0,
        prompt_tokens_reported=round(sum(prompts) / len(prompts)) if prompts else None,
        tokens_counted_from=("usage" if from_usage == {True} else
                             "chunks" if from_usage == {False} else
                             "mixed" if from_usage else "none"),
        ttft=summarise([o.ttft for o in ok if o.ttft is not None]),
        itl=summarise([g for o in ok for g in o.gaps]),
        e2e=summarise([o.e2e for o in ok]),
    )


def run(s: LoadSettings, api_key: str | None,
        progress: Callable[[str], None] | None = None) -> LoadRun:
    s.check()
    say = progress or (lambda _msg: None)
    started = utcnow()
    client = _Client(s, api_key, max(s.concurrency))
    try:
        served = client.models()
        if s.model is None:
            if not served:
                raise NotFoundError(f"{s.url} serves no models", hint="start one, or pass --model")
            model = next(iter(served))
        else:
            model = s.model
        prompt = make_prompt(s.prompt_tokens)
        if s.warmup:
            say(f"{model}: warm-up request")
            warm = client.one(model, prompt)
            if not warm.ok:
                raise NetworkError(f"the warm-up request to {s.url} failed: {warm.error}",
                                   hint="check --model and --api-key; --no-warmup skips this")
        levels = []
        for c in s.concurrency:
            say(f"{model}: concurrency {c}, {s.requests} requests")
            levels.append(_level(client, model, prompt, c, s.requests))
    finally:
        client.close()
    return LoadRun(kind="serve", started_at=started, finished_at=utcnow(), url=s.url,
                   model=model, runtime=served.get(model), settings=s, levels=tuple(levels))
