"""Facts read from a GGUF header with the `gguf` package, cached per blob.

Parsing a header with a large vocabulary takes a second or more, and a blob's bytes never
change, so the facts are computed once (at pull time) and kept beside the blob by sha256.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from sovctl.errors import IntegrityError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.store.gguf_header import read_header

_EMBEDDING_ARCHS = frozenset({"bert", "nomic-bert", "jina-bert-v2", "modern-bert", "t5encoder"})


def is_embedding(arch: str, keys: Container[str]) -> bool:
    """The one rule for "an embedding model": an encoder architecture, or a header (`keys`, its
    metadata keys) that says how to pool."""
    return arch in _EMBEDDING_ARCHS or f"{arch}.pooling_type" in keys


# llama.cpp's LLAMA_POOLING_TYPE_RANK: the model scores a (query, document) pair through its
# classifier head (the cls.* tensors), as a reranker does.
POOLING_RANK = 4
_CLASSIFIER = "cls.output.weight"


def is_reranker(arch: str, kv: Mapping[str, object], tensors: Container[str]) -> bool:
    """The one rule for "a reranker": a header that pools by rank, or a classifier head
    (`tensors`, its tensors' names) that llama-server's --reranking scores with."""
    return kv.get(f"{arch}.pooling_type") == POOLING_RANK or _CLASSIFIER in tensors


@dataclass(frozen=True)
class GgufFacts:
    architecture: str
    parameters: int
    quantization: str
    context_length: int | None
    chat_template: bool
    embedding: bool
    rerank: bool  # a reranker (is_reranker); an older cache lacks it and is read again
    tensors: int


def _wanted(key: str) -> bool:
    return key in ("general.architecture", "general.file_type", "tokenizer.chat_template") \
        or key.endswith((".context_length", ".pooling_type"))


def read_facts(path: Path, label: str | None = None) -> GgufFacts:
    # Our own header walk, not gguf.GGUFReader: that builds numpy objects for every vocabulary
    # entry (2.6 s for SmolLM2's 49k tokens, 11 s for 150k), this skips them (0.2 s).
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    try:
        header = read_header(path, _wanted)
    except (ValueError, KeyError, OSError) as e:
        raise IntegrityError(
            f"{label or path.name}: not a valid GGUF file, its header is truncated or corrupt "
            f"({type(e).__name__}: {e})",
            hint="nothing was stored; fetch the whole file again from its origin",
        ) from None
    kv = header.kv
    arch = str(kv.get("general.architecture") or "unknown")
    counts: dict[int, int] = {}
    for t in header.tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.elements
    file_type = kv.get("general.file_type")
    if file_type is not None:
        try:
            quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type-{file_type}"
    else:
        # Older files carry no file type: name the type most weights use.
        quant = GGMLQuantizationType(max(counts, key=counts.__getitem__)).name if counts else "?"
    ctx = kv.get(f"{arch}.context_length")
    return GgufFacts(
        architecture=arch,
        parameters=sum(t.elements for t in header.tensors),
        quantization=quant,
        context_length=int(ctx) if ctx is not None else None,
        chat_template="tokenizer.chat_template" in kv,
        embedding=is_embedding(arch, kv),
        rerank=is_reranker(arch, kv, {t.name for t in header.tensors}),
        tensors=len(header.tensors),
    )


def _cache_path(home: Home, sha256: str) -> Path:
    return home.root / "store" / "facts" / f"sha256-{sha256}.json"


def remember(home: Home, sha256: str, facts: GgufFacts) -> None:
    atomic_write(_cache_path(home, sha256), json.dumps(asdict(facts)).encode())


def facts_for(home: Home, sha256: str, blob: Path, *, write: bool = True) -> GgufFacts:
    """The blob's facts from the cache, else from its header; `write=False` for the paths
    that promise to write nothing (planning a stack, `sovctl plan`)."""
    cache = _cache_path(home, sha256)
    try:
        return GgufFacts(**json.loads(cache.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        facts = read_facts(blob)
        if write:
            remember(home, sha256, facts)
        return facts


def forget(home: Home, sha256: str) -> None:
    _cache_path(home, sha256).unlink(missing_ok=True)
