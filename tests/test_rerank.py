"""POST /v1/rerank: a reranker (role "rerank") served by llama-server --reranking.

No reranker is among the shared test models, so `write_reranker` builds one at test time: the
weights of all-MiniLM-L6-v2 (a real BERT encoder) with its pooling set to rank and a classifier
head (cls, cls.output) of *random* weights. Its scores mean nothing; the tests check the
plumbing (roles, argv, routing, validation, the answer's shape and order, accounting), never
the quality of a ranking. docs/commands/serve.md names real rerankers for operators.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL
from tests.helpers import run, run_json, wait_for
from tests.test_serve import Stack, start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

QUERY = "Where do cats sleep?"
DOCUMENTS = ["Quarterly revenue grew by ten percent", "A cat sleeps on the warm mat",
             "Kittens nap in a basket", "The train leaves at noon", ""]


def write_reranker(dest: Path, source: Path = EMBED_MODEL, seed: int = 0) -> Path:
    """A tiny reranker with a random head, for the plumbing only (see the module's note):
    `source`'s metadata and tensors, its pooling type set to rank (llama.cpp's
    LLAMA_POOLING_TYPE_RANK), and the head llama.cpp's BERT scores a pair with: cls
    (n_embd x n_embd, then tanh) and cls.output (n_embd x 1)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dest, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == f"{arch}.pooling_type":
            value = int(gguf.PoolingType.RANK)
        elif name == "general.name":
            value = "tiny random reranker (sovctl tests only)"
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    rng = np.random.default_rng(seed)
    writer.add_tensor("cls.weight", rng.normal(0, 0.05, (n_embd, n_embd)).astype(np.float32))
    writer.add_tensor("cls.bias", np.zeros(n_embd, np.float32))
    writer.add_tensor("cls.output.weight", rng.normal(0, 0.5, (1, n_embd)).astype(np.float32))
    writer.add_tensor("cls.output.bias", np.zeros(1, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reranker(tmp_path_factory.mktemp("reranker") / "tiny-reranker.gguf")


@pytest.fixture(scope="module")
def stack(reranker: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(tmp_path_factory.mktemp("stack"), "--chat", "smol", "--rerank", "rr",
                    models=((CHAT_MODEL, "smol"), (reranker, "rr")))
    yield s
    stop_stack(s)


def rerank(stack: Stack, **body: Any) -> httpx.Response:
    return httpx.post(f"{stack.base}/v1/rerank", json=body, timeout=60)


def test_the_test_reranker_is_one(reranker: Path) -> None:
    from sovctl.store.gguf_info import read_facts

    facts = read_facts(reranker)
    assert facts.rerank and facts.embedding and facts.architecture == "bert"
    assert not read_facts(EMBED_MODEL).rerank
    assert not read_facts(CHAT_MODEL).rerank


def test_plan_names_a_reranker_so(reranker: Path, tmp_path: Path) -> None:
    doc = run_json(tmp_path / "home", "plan", str(reranker))
    assert doc["_rc"] == 0, doc["_stderr"]
    assert doc["data"]["fit"]["role"] == "rerank"


def test_rerank_orders_documents(stack: Stack) -> None:
    r = rerank(stack, model="rr", query=QUERY, documents=DOCUMENTS)
    assert r.status_code == 200, r.text
    doc = r.json()
    results = doc["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCUMENTS)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert all(set(x) == {"index", "relevance_score"} for x in results)
    assert doc["usage"]["prompt_tokens"] > 0
    # The same pairs score the same, whatever else is in the request.
    by_index = {x["index"]: x["relevance_score"] for x in results}
    alone = rerank(stack, model="rr", query=QUERY, documents=[DOCUMENTS[2]]).json()
    assert alone["results"][0]["relevance_score"] == pytest.approx(by_index[2], abs=1e-3)

    # top_n keeps the best; return_documents adds each one's text; no model: the reranker.
    top = rerank(stack, query=QUERY, documents=DOCUMENTS, top_n=2,
                 return_documents=True).json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in results[:2]]
    assert [x["document"] for x in top] == [{"text": DOCUMENTS[x["index"]]} for x in top]
    assert len(rerank(stack, model="rr", query=QUERY, documents=DOCUMENTS,
                      top_n=50).json()["results"]) == len(DOCUMENTS)


def test_an_input_longer_than_the_model_takes_is_a_400(stack: Stack) -> None:
    # llama-server answers it with a 500 that tells its operator to raise the batch size.
    r = rerank(stack, model="rr", query=QUERY, documents=["word " * 3000])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "shorten or split" in err["message"]


def test_rerank_is_counted(stack: Stack) -> None:
    assert rerank(stack, model="rr", query=QUERY, documents=DOCUMENTS[:2]).status_code == 200
    metrics = httpx.get(f"{stack.base}/metrics").text
    assert 'model="rr",endpoint="/v1/rerank",code="200"' in metrics

    def rows() -> list[tuple[str, int, int]]:
        # The ledger is written in batches by a thread: read it until the row lands.
        with contextlib.closing(sqlite3.connect(stack.home / "ledger" / "ledger.sqlite3")) as db:
            return db.execute("SELECT endpoint, status, tokens_in FROM requests "
                              "WHERE model = 'rr'").fetchall()

    wait_for(rows, timeout=20)
    assert all(endpoint == "/v1/rerank" for endpoint, _, _ in rows())
    assert any(status == 200 and tokens > 0 for _, status, tokens in rows())


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"documents": ["a"]}, "query", "missing_required_parameter"),
    ({"query": 3, "documents": ["a"]}, "query", "invalid_type"),
    ({"query": "", "documents": ["a"]}, "query", "invalid_value"),
    ({"query": "q"}, "documents", "missing_required_parameter"),
    ({"query": "q", "documents": []}, "documents", "empty_array"),
    ({"query": "q", "documents": "a"}, "documents", "invalid_type"),
    ({"query": "q", "documents": ["a", {"text": "b"}]}, "documents[1]", "invalid_type"),
    ({"query": "q", "documents": ["a"] * 1001}, "documents", "array_above_max_length"),
    ({"query": "q", "documents": ["a" * 1_000_000] * 5}, "documents",
     "string_above_max_length"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n", "invalid_value"),
    ({"query": "q", "documents": ["a"], "top_n": "2"}, "top_n", "invalid_type"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents",
     "invalid_type"),
    ({"query": "q", "documents": ["a"], "stream": True}, "stream", "unsupported_value"),
])
def test_rerank_bad_input(stack: Stack, body: dict[str, Any], param: str, code: str) -> None:
    r = rerank(stack, model="rr", **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and param in err["message"]


def test_roles_are_kept_apart(stack: Stack) -> None:
    r = rerank(stack, model="smol", query=QUERY, documents=DOCUMENTS)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_role_mismatch"
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user",
                                                                 "content": "hi"}]}),
                       ("/v1/embeddings", {"input": "hi"})):
        r = httpx.post(f"{stack.base}{path}", json={"model": "rr", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_role_mismatch"
    models = {m["id"]: m["role"] for m in httpx.get(f"{stack.base}/v1/models").json()["data"]}
    assert models == {"smol": "chat", "rr": "rerank"}


def test_plan_refusals(reranker: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    for path, name in ((reranker, "rr"), (EMBED_MODEL, "minilm")):
        run(home, "pull", str(path), "--name", name, check=True)
    doc = run_json(home, "serve", "--rerank", "rr", "--dry-run")
    args = next(p for p in doc["data"]["processes"] if p["name"] == "rr")["argv"]
    assert "--reranking" in args and "--jinja" not in args and "--embeddings" not in args
    # The encoder's own context, not [serve] n_ctx: a (query, document) pair is one batch.
    assert args[args.index("--ubatch-size") + 1] == "512"
    for flags, message in ((("--chat", "rr"), "rr is a reranker"),
                           (("--embedding", "rr"), "rr is a reranker"),
                           (("--rerank", "minilm"), "without a reranker's head")):
        r = run(home, "serve", *flags, "--dry-run")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # llama-cpp-python cannot rerank: refused, naming the engine that can.
    r = run(home, "serve", "--rerank", "rr", "--dry-run",
            env={"SOVCTL_SERVE__RUNTIME": "llama-cpp-python"})
    assert r.returncode != 0 and "reranking needs the llama-server runtime" in r.stderr
    (home / "sovctl.toml").write_text('[models.rr]\nrole = "rerank"\n')
    doc = run_json(home, "serve", "--dry-run")
    assert [p["name"] for p in doc["data"]["processes"]] == ["rr", "gateway"]
    assert json.dumps(doc).count("--reranking") == 1
