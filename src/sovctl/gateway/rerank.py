"""POST /v1/rerank: the shape llama-server, Jina and Cohere share.

A request names a `query`, its `documents` (strings), optionally `top_n` and
`return_documents`; the answer lists `results[{index, relevance_score[, document]}]`, best
first, with the `usage` the runtime counted. The runtime (llama-server started with
--reranking on a model that pools by rank) scores each (query, document) pair; the gateway
checks the request (`validate`), and holds the answer to the contract whatever the runtime
did with the optional fields: sorted by score, cut to `top_n`, each document's text added
as `{"text": ...}` (Jina's and Cohere's form) when asked for, which llama-server ignores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

ENDPOINT = "/v1/rerank"


def reshape(payload: dict[str, Any]) -> Callable[[bytes], bytes]:
    """What turns the runtime's answer to `payload` into the answer the client gets."""
    documents: list[str] = payload["documents"]
    top_n: int | None = payload.get("top_n")
    with_documents = bool(payload.get("return_documents"))

    def apply(content: bytes) -> bytes:
        try:
            doc = json.loads(content)
            results = doc["results"]
            results.sort(key=lambda r: -float(r["relevance_score"]))
            if top_n is not None:
                del results[top_n:]
            if with_documents:
                for r in results:
                    r["document"] = {"text": documents[r["index"]]}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return content  # not a rerank answer: passed on as the runtime gave it
        return json.dumps(doc).encode()

    return apply
