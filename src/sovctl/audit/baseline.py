"""The fixed requests of the audit, their answers, and the baseline they are compared with.

Every served model gets the same requests, in the same order, against a freshly started stack,
at temperature 0 with a fixed seed: a chat model answers a chat request (plain, then streaming)
and a completion; a completion model a completion; an embedding model one embeddings request;
a reranker one rerank request (a fixed query over fixed documents), compared by the order it
ranks the documents in, exactly, and its scores, within a tolerance.
A chat model that takes tools (the gateway's `/v1/models` says so in `capabilities`) also
answers a request that names the tool it must call, and one with vision a request with an
image; a chat model without them has these requests skipped, and the exchange says why. A chat
model on an engine that speaks Anthropic's Messages API and OpenAI's Responses API (its
`surfaces`) also answers the chat request's question once on each, at temperature 0; on
another engine these are skipped, and said. A baseline recorded before these requests lacks
their answers: they are then not compared, and the comparison says so (`unrecorded`), until
`sovctl audit baseline` records a new one.

A baseline is recorded per model and per model file, under
`HOME/audit/baselines/NAME/sha256-<hex>.json`, with the engine that served it (runtime and
llama.cpp build). A model whose file changed since its baseline (same name, another sha256) is
a difference, never a reason to record a new baseline silently: `sovctl audit baseline` records
one on purpose. A baseline from another runtime is not compared at all (llama-server and
llama-cpp-python answer differently even at temperature 0): the blackout says so and records a
new one first.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovctl.engines import DISTRIBUTION, ENGINES, Surface
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.llamacpp import build_info
from sovctl.result import utcnow
from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.plan import Plan, ServedModel
from sovctl.sse import sse_data
from sovctl.vision.images import tiny_png

BASELINE_SCHEMA = "sovctl.audit.baseline/v1"
EMBEDDING_TOLERANCE = 1e-5
# A reranker's scores are unnormalised logits, an order of magnitude above a unit vector's
# components: the same float noise is larger in absolute terms.
RERANK_TOLERANCE = 1e-4
SEED = 42
MAX_TOKENS = 32

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Tell me a short story about a lighthouse keeper."},
]
COMPLETION_PROMPT = "Once upon a time, in a small village by the sea,"
EMBEDDING_INPUTS = [
    "The lighthouse keeper climbed the stairs at dusk.",
    "Quarterly revenue grew by ten percent.",
    "A sovereign stack keeps working when the network is gone.",
]
RERANK_QUERY = "What keeps working without a network?"
RERANK_DOCUMENTS = EMBEDDING_INPUTS

# (request id, endpoint, body without "model") per role, in the order they are sent.
_SAMPLING = {"temperature": 0, "seed": SEED, "max_tokens": MAX_TOKENS}
REQUESTS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "chat": [
        ("chat", "/v1/chat/completions", {"messages": CHAT_MESSAGES, **_SAMPLING}),
        ("chat_stream", "/v1/chat/completions",
         {"messages": CHAT_MESSAGES, **_SAMPLING, "stream": True}),
        ("completion", "/v1/completions", {"prompt": COMPLETION_PROMPT, **_SAMPLING}),
    ],
    "completion": [
        ("completion", "/v1/completions", {"prompt": COMPLETION_PROMPT, **_SAMPLING}),
    ],
    "embedding": [
        ("embeddings", "/v1/embeddings", {"input": EMBEDDING_INPUTS}),
    ],
    "rerank": [
        ("rerank", "/v1/rerank", {"query": RERANK_QUERY, "documents": RERANK_DOCUMENTS}),
    ],
}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# The call and its arguments take more than the 32 tokens of the text answers.
TOOL_CALL_BODY = {
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {
        "name": "get_weather"}},
    **_SAMPLING, "max_tokens": 64}
IMAGE_BODY = {
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(tiny_png()).decode()}}]}],
    **_SAMPLING}
# Requests a chat model answers only with a capability: (request id, capability, body, why it
# is skipped without the capability).
CAPABLE_REQUESTS = (
    ("tool_call", "tools", TOOL_CALL_BODY, "no tool support in its template"),
    ("image", "vision", IMAGE_BODY, "no vision projector: pulled without --mmproj"),
)
# The chat request's question on the other surfaces a chat model may be served on: (request id,
# surface, body without "model"). Appended after the others, so that an older baseline's
# answers come from the same sequence of requests.
MESSAGES_BODY = {"system": CHAT_MESSAGES[0]["content"], "messages": CHAT_MESSAGES[1:],
                 "temperature": 0, "max_tokens": MAX_TOKENS}
RESPONSES_BODY = {"instructions": CHAT_MESSAGES[0]["content"],
                  "input": CHAT_MESSAGES[1]["content"], "temperature": 0,
                  "max_output_tokens": MAX_TOKENS, "store": False}
SURFACE_REQUESTS = (
    ("messages", Surface.MESSAGES, MESSAGES_BODY),
    ("responses", Surface.RESPONSES, RESPONSES_BODY),
)
SURFACE_IDS = tuple(request for request, _, _ in SURFACE_REQUESTS)


def requests_for(model: ServedModel, capabilities: Mapping[str, Any] | None
                 ) -> tuple[list[tuple[str, str, dict[str, Any]]], list[tuple[str, str]]]:
    """(the fixed requests the model gets, [(request id, why skipped)]). `capabilities` is what
    the gateway's /v1/models lists for it; None when it did not list it."""
    sent = list(REQUESTS.get(model.role, []))
    skipped: list[tuple[str, str]] = []
    if model.role != "chat":
        return sent, skipped
    for request, capability, body, why in CAPABLE_REQUESTS:
        have = (capabilities or {}).get(capability)
        if have:
            sent.append((request, "/v1/chat/completions", body))
        else:
            skipped.append((request, why if have is False else
                            f"the gateway did not say whether it takes {capability}"))
    engine = ENGINES.get(model.runtime)
    for request, surface, body in SURFACE_REQUESTS:
        if engine is not None and surface in engine.surfaces:
            sent.append((request, str(surface), body))
        else:
            skipped.append((request, f"the {model.runtime} runtime does not speak {surface}"))
    return sent, skipped


@dataclass(frozen=True)
class Answer:
    """One fixed request through the gateway and what came back."""

    model: str
    # "chat" | "chat_stream" | "completion" | "embeddings" | "tool_call" | "image" | "messages"
    # | "responses" | "rerank"
    request: str
    endpoint: str
    status: int  # HTTP status; 0 when no response arrived
    seconds: float
    text: str | None = None
    finish_reason: str | None = None
    events: int = 0  # server-sent events received (streaming)
    vectors: list[list[float]] | None = None
    error: str = ""
    tool_call: dict[str, Any] | None = None  # {"name", "arguments" (parsed)}
    prompt_tokens: int | None = None  # the image request's: the image's tokens are in it
    scores: list[float] | None = None  # the rerank's: one per document, in the documents' order

    @property
    def ok(self) -> bool:
        if self.status != 200 or self.error:
            return False
        if self.request == "embeddings":
            return self.vectors is not None and bool(self.vectors) and all(self.vectors)
        if self.request == "tool_call":
            return self.tool_call is not None and self.finish_reason == "tool_calls"
        if self.request == "rerank":
            return bool(self.scores)
        return self.text is not None and self.finish_reason is not None


@dataclass(frozen=True)
class Exchange:
    """All fixed requests of one run, plus the gateway's model list."""

    answers: tuple[Answer, ...]
    models_status: int
    models_listed: tuple[str, ...]
    models_error: str = ""
    seconds: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Model -> its capabilities as /v1/models listed them; model -> [(request, why skipped)].
    capabilities: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    skipped: Mapping[str, Sequence[tuple[str, str]]] = field(default_factory=dict)

    def for_model(self, name: str) -> list[Answer]:
        return [a for a in self.answers if a.model == name]


def _stream(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]
            ) -> tuple[int, str, str | None, int, str]:
    parts: list[str] = []
    finish: str | None = None
    events = 0
    error = ""
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, "", None, 0, r.text[:300]
        for data in sse_data(r.iter_lines()):
            events += 1
            chunk = json.loads(data)
            if "error" in chunk:
                error = json.dumps(chunk["error"])[:300]
                break
            for choice in chunk.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
        return 200, "".join(parts), finish, events, error


def _one(client: Any, base: str, headers: dict[str, str], model: str, request: str,
         endpoint: str, body: dict[str, Any]) -> Answer:
    import httpx

    t0 = time.perf_counter()
    payload = {"model": model, **body}
    try:
        if body.get("stream"):
            status, text, finish, events, error = _stream(client, base + endpoint, payload,
                                                          headers)
            return Answer(model, request, endpoint, status, time.perf_counter() - t0,
                          text=text, finish_reason=finish, events=events, error=error)
        r = client.post(base + endpoint, json=payload, headers=headers)
        seconds = time.perf_counter() - t0
        if r.status_code != 200:
            return Answer(model, request, endpoint, r.status_code, seconds, error=r.text[:300])
        doc = r.json()
        if request == "messages":
            text = "".join(b.get("text") or "" for b in doc["content"] if b["type"] == "text")
            return Answer(model, request, endpoint, 200, seconds, text=text,
                          finish_reason=doc.get("stop_reason"))
        if request == "responses":
            text = "".join(part.get("text") or "" for item in doc["output"]
                           if item.get("type") == "message"
                           for part in item.get("content") or ())
            return Answer(model, request, endpoint, 200, seconds, text=text,
                          finish_reason=doc.get("status"))
        if request == "embeddings":
            vectors = [d["embedding"] for d in sorted(doc["data"], key=lambda d: d["index"])]
            return Answer(model, request, endpoint, 200, seconds, vectors=vectors)
        if request == "rerank":
            results = sorted(doc["results"], key=lambda r: r["index"])
            if [r["index"] for r in results] != list(range(len(body["documents"]))):
                return Answer(model, request, endpoint, 200, seconds,
                              error=f"scored documents {[r['index'] for r in results]} of "
                              f"{len(body['documents'])}")
            return Answer(model, request, endpoint, 200, seconds,
                          scores=[float(r["relevance_score"]) for r in results])
        choice = doc["choices"][0]
        if request == "tool_call":
            call = choice["message"]["tool_calls"][0]["function"]
            return Answer(model, request, endpoint, 200, seconds,
                          finish_reason=choice.get("finish_reason"),
                          tool_call={"name": call["name"],
                                     "arguments": json.loads(call["arguments"])})
        text = choice["text"] if endpoint == "/v1/completions" else choice["message"]["content"]
        prompt_tokens = doc["usage"]["prompt_tokens"] if request == "image" else None
        return Answer(model, request, endpoint, 200, seconds, text=text or "",
                      finish_reason=choice.get("finish_reason"), prompt_tokens=prompt_tokens)
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        return Answer(model, request, endpoint, 0, time.perf_counter() - t0,
                      error=f"{type(e).__name__}: {e}"[:300])


def exercise(base: str, models: Sequence[ServedModel], headers: Mapping[str, str],
             timeout: float = 120.0, after: Callable[[str], None] | None = None) -> Exchange:
    """Send every fixed request through the gateway at `base` (http://host:port); `after`
    is called with each model's name once its requests are answered, while its runtime is
    surely loaded (one loaded on demand may be unloaded for the next)."""
    import httpx

    t0 = time.perf_counter()
    answers: list[Answer] = []
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        # First, as the capabilities it lists decide which requests a model gets.
        listed: tuple[str, ...] = ()
        capabilities: dict[str, Mapping[str, Any]] = {}
        error = ""
        try:
            r = client.get(base + "/v1/models", headers=dict(headers))
            status = r.status_code
            if status == 200:
                data = r.json()["data"]
                listed = tuple(d["id"] for d in data)
                capabilities = {d["id"]: d.get("capabilities") or {} for d in data}
            else:
                error = r.text[:300]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            status, error = 0, f"{type(e).__name__}: {e}"[:300]
        skipped: dict[str, list[tuple[str, str]]] = {}
        for m in models:
            sent, skipped[m.name] = requests_for(m, capabilities.get(m.name))
            for request, endpoint, body in sent:
                answers.append(_one(client, base, dict(headers), m.name, request, endpoint,
                                    body))
            if after is not None:
                after(m.name)
    return Exchange(tuple(answers), status, listed, error, time.perf_counter() - t0,
                    capabilities=capabilities,
                    skipped={n: s for n, s in skipped.items() if s})


# -- engines -------------------------------------------------------------------------------------

@functools.cache
def _llama_server_build(binary: str) -> str:
    """What the binary says of itself, e.g. '0.5.0-dev (build 1, commit 0c1e570)': the one that
    runs may not be the build scripts/setup recorded ([serve] llama_server)."""
    import subprocess

    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    line = next((ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("version:")),
                "")
    return line.removeprefix("version:").strip() or "unknown"


def _llama_cpp_python_build() -> str:
    from importlib import metadata

    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
    build = build_info()
    return f"{version} (llama.cpp {build.commit})" if build and build.commit else version


def engines(plan: Plan) -> dict[str, dict[str, str]]:
    """Model name -> the engine that serves it: {"runtime", "build"}."""
    out = {}
    for p in plan.processes:
        if p.kind != ProcessKind.RUNTIME:
            continue
        # A native engine says what it is itself; a Python one is the installed package's.
        build = (_llama_server_build(p.argv.args[p.argv.args.index("--exec") + 1])
                 if ENGINES[p.runtime].binary else _llama_cpp_python_build())
        out[p.model] = {"runtime": p.runtime, "build": build}
    return out


def describe_engine(engine: Mapping[str, Any] | None) -> str:
    if not engine:
        return "an unrecorded runtime (the baseline predates sovctl recording it)"
    return f"{engine.get('runtime')} {engine.get('build')}"


# -- stored baselines -------------------------------------------------------------------------

def baselines_dir(home: Home) -> Path:
    return home.root / "audit" / "baselines"


def baseline_path(home: Home, name: str, sha256: str) -> Path:
    return baselines_dir(home) / name / f"sha256-{sha256}.json"


def has_any(home: Home, name: str) -> bool:
    d = baselines_dir(home) / name
    return d.is_dir() and any(d.glob("sha256-*.json"))


@dataclass(frozen=True)
class Found:
    """The baseline a model is compared with."""

    status: str  # "match" (recorded for this very file) | "changed" (another file) | "missing"
    path: Path | None = None
    doc: Mapping[str, Any] | None = None


def find(home: Home, model: ServedModel) -> Found:
    exact = baseline_path(home, model.name, model.sha256)
    if exact.is_file():
        return Found("match", exact, json.loads(exact.read_text()))
    d = baselines_dir(home) / model.name
    others = sorted(d.glob("sha256-*.json"), key=lambda p: p.stat().st_mtime) \
        if d.is_dir() else []
    if others:
        return Found("changed", others[-1], json.loads(others[-1].read_text()))
    return Found("missing")


def other_runtime(found: Found, engine: Mapping[str, str]) -> str | None:
    """The engine a baseline for this very file was recorded with, when it is another runtime
    than `engine` (such a baseline is recorded again, not compared); else None."""
    if found.status != "match" or found.doc is None:
        return None
    recorded = found.doc.get("engine")
    if recorded and recorded.get("runtime") == engine["runtime"]:
        return None
    return describe_engine(recorded)


def record(home: Home, models: Iterable[ServedModel], exchange: Exchange,
           context: Mapping[str, Any], served_by: Mapping[str, Mapping[str, str]]
           ) -> list[Path]:
    """Write one baseline per model from a run's answers; all must have answered.
    `served_by` is each model's engine (see `engines`)."""
    from dataclasses import asdict

    written = []
    for m in models:
        answers = exchange.for_model(m.name)
        doc = {
            "schema": BASELINE_SCHEMA,
            "model": m.name,
            "role": m.role,
            "sha256": m.sha256,
            "size": m.size,
            "recorded_at": utcnow(),
            "engine": dict(served_by[m.name]),
            **dict(context),
            "answers": {a.request: {k: v for k, v in asdict(a).items()
                                    if k not in ("seconds", "model")} for a in answers},
        }
        path = baseline_path(home, m.name, m.sha256)
        atomic_write(path, json.dumps(doc, indent=1).encode())
        written.append(path)
    return written


def _short(text: str | None, n: int = 60) -> str:
    text = (text or "").replace("\n", " ")
    return repr(text if len(text) <= n else text[:n] + "…")


def compare(model: ServedModel, found: Found, answers: Sequence[Answer]) -> list[str]:
    """Every difference between the answers and the baseline, in words; empty when unchanged."""
    if found.doc is None:
        return [f"{model.name}: no baseline"]
    diffs = []
    if found.status == "changed":
        diffs.append(f"{model.name}: model file changed since its baseline (sha256 "
                     f"{str(found.doc.get('sha256'))[:12]}… recorded "
                     f"{found.doc.get('recorded_at')}, now {model.sha256[:12]}…; if the new "
                     "file is intended, record a new baseline with 'sovctl audit baseline')")
    recorded = found.doc.get("answers", {})
    for a in answers:
        base = recorded.get(a.request)
        if base is None and a.request in SURFACE_IDS:
            continue  # a baseline from before these requests: `unrecorded` says so
        if base is None:
            diffs.append(f"{model.name}/{a.request}: not in the baseline")
            continue
        if a.request == "embeddings":
            got, want = a.vectors or [], base.get("vectors") or []
            if len(got) != len(want) or any(len(x) != len(y) for x, y in zip(got, want,
                                                                              strict=False)):
                diffs.append(f"{model.name}/embeddings: shape differs "
                             f"({len(got)}x{len(got[0]) if got else 0} vs baseline "
                             f"{len(want)}x{len(want[0]) if want else 0})")
                continue
            worst = max((abs(x - y) for u, v in zip(got, want, strict=True)
                         for x, y in zip(u, v, strict=True)), default=0.0)
            if worst > EMBEDDING_TOLERANCE:
                diffs.append(f"{model.name}/embeddings: max |Δ| {worst:.3g} > "
                             f"{EMBEDDING_TOLERANCE:g}")
        elif a.request == "rerank":
            diffs += rerank_diffs(model.name, a.scores or [], base.get("scores") or [])
        elif a.request == "tool_call":
            if a.tool_call != base.get("tool_call"):
                diffs.append(f"{model.name}/tool_call: call differs: baseline "
                             f"{_call(base.get('tool_call'))}, now {_call(a.tool_call)}")
        elif a.text != base.get("text"):
            diffs.append(f"{model.name}/{a.request}: text differs: baseline "
                         f"{_short(base.get('text'))}, now {_short(a.text)}")
        # The image's tokens are most of this prompt: a different count, a different image path.
        if a.request == "image" and a.prompt_tokens != base.get("prompt_tokens"):
            diffs.append(f"{model.name}/image: prompt of {a.prompt_tokens} tokens, baseline "
                         f"{base.get('prompt_tokens')}")
    return diffs


def ranking(scores: Sequence[float]) -> list[int]:
    """The documents' indices, best first."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def rerank_diffs(name: str, got: Sequence[float], want: Sequence[float]) -> list[str]:
    """How a reranker's scores differ from the ones wanted: order, then each score."""
    if len(got) != len(want):
        return [f"{name}/rerank: {len(got)} documents scored, baseline {len(want)}"]
    if ranking(got) != ranking(want):
        return [f"{name}/rerank: order differs: baseline {ranking(want)}, now {ranking(got)}"]
    worst = max((abs(x - y) for x, y in zip(got, want, strict=True)), default=0.0)
    if worst > RERANK_TOLERANCE:
        return [f"{name}/rerank: scores max |Δ| {worst:.3g} > {RERANK_TOLERANCE:g}"]
    return []


def unrecorded(found: Found, answers: Sequence[Answer]) -> list[str]:
    """The requests on the Messages and Responses surfaces that the baseline predates: sent,
    not compared."""
    recorded = (found.doc or {}).get("answers") or {}
    return [a.request for a in answers if a.request in SURFACE_IDS and a.request not in recorded]


def describe_call(call: Mapping[str, Any] | None) -> str:
    if not call:
        return "no call"
    return f"{call.get('name')}({json.dumps(call.get('arguments'), ensure_ascii=False)})"


def _call(call: Mapping[str, Any] | None) -> str:
    return _short(describe_call(call), 80)


def max_embedding_diff(found: Found, answers: Sequence[Answer]) -> float | None:
    if found.doc is None:
        return None
    worst: float | None = None
    for a in answers:
        base = (found.doc.get("answers") or {}).get(a.request) or {}
        if a.request == "embeddings" and a.vectors and base.get("vectors"):
            try:
                d = max(abs(x - y) for u, v in zip(a.vectors, base["vectors"], strict=True)
                        for x, y in zip(u, v, strict=True))
            except ValueError:
                continue
            worst = d if worst is None else max(worst, d)
    return worst


def max_rerank_diff(found: Found, answers: Sequence[Answer]) -> float | None:
    if found.doc is None:
        return None
    base = ((found.doc.get("answers") or {}).get("rerank") or {}).get("scores")
    got = next((a.scores for a in answers if a.request == "rerank"), None)
    if not base or not got or len(base) != len(got):
        return None
    return max(abs(x - y) for x, y in zip(got, base, strict=True))
