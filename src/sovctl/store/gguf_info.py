"""Facts read from a GGUF header with the `gguf` package, cached per blob.

Parsing a header with a large vocabulary takes a second or more, and a blob's bytes never
change, so the facts are computed once (at pull time) and kept beside the blob by sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sovctl.errors import IntegrityError
from sovctl.fsutil import atomic_write
from sovctl.home import Home

_EMBEDDING_ARCHS = {"bert", "nomic-bert", "jina-bert-v2", "modern-bert", "t5encoder"}


@dataclass(frozen=True)
class GgufFacts:
    architecture: str
    parameters: int
    quantization: str
    context_length: int | None
    chat_template: bool
    embedding: bool
    tensors: int


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_facts(path: Path, label: str | None = None) -> GgufFacts:
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader signals corrupt input with assorted exception types
        raise IntegrityError(
            f"{label or path.name}: not a valid GGUF file, its header is truncated or corrupt "
            f"({type(e).__name__}: {e})",
            hint="nothing was stored; fetch the whole file again from its origin",
        ) from None
    arch = str(_value(reader, "general.architecture") or "unknown")
    file_type = _value(reader, "general.file_type")
    if file_type is not None:
        try:
            quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type-{file_type}"
    else:
        # Older files carry no file type: name the type most weights use.
        counts: dict[int, int] = {}
        for t in reader.tensors:
            counts[int(t.tensor_type)] = counts.get(int(t.tensor_type), 0) + int(t.n_elements)
        quant = GGMLQuantizationType(max(counts, key=counts.__getitem__)).name if counts else "?"
    ctx = _value(reader, f"{arch}.context_length")
    return GgufFacts(
        architecture=arch,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        quantization=quant,
        context_length=int(ctx) if ctx is not None else None,
        chat_template=_value(reader, "tokenizer.chat_template") is not None,
        embedding=arch in _EMBEDDING_ARCHS or f"{arch}.pooling_type" in reader.fields,
        tensors=len(reader.tensors),
    )


def _cache_path(home: Home, sha256: str) -> Path:
    return home.root / "store" / "facts" / f"sha256-{sha256}.json"


def remember(home: Home, sha256: str, facts: GgufFacts) -> None:
    atomic_write(_cache_path(home, sha256), json.dumps(asdict(facts)).encode())


def facts_for(home: Home, sha256: str, blob: Path) -> GgufFacts:
    cache = _cache_path(home, sha256)
    try:
        return GgufFacts(**json.loads(cache.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        facts = read_facts(blob)
        remember(home, sha256, facts)
        return facts


def forget(home: Home, sha256: str) -> None:
    _cache_path(home, sha256).unlink(missing_ok=True)
