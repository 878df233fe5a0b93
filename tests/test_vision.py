"""Vision: a model pulled with its projector, images through the gateway, and `sovctl tag`.

The projector in the shared models folder (mmproj-tiny-random-f16.gguf, made for SmolLM2) has
random weights. These tests prove the image path: both files pinned and verified, served
together (llama-server --mmproj), an inline image reaching the model (the prompt grows by the
image's tokens), remote images refused. They say nothing about the quality of the tags, which
are meaningless words here; a real vision model is what an operator pulls.
"""

from __future__ import annotations

import hashlib
import os
import threading
import tomllib
from base64 import b64encode
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from tests.conftest import CHAT_MODEL, MMPROJ, TINY_MODEL
from tests.helpers import run, run_json
from tests.hubserver import REPO, catalog, serve
from tests.test_serve import Stack, start_stack, stop_stack

from sovctl.vision.images import tiny_png
from sovctl.vision.tag import image_type, parse_tags

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

MMPROJ_SHA = "42ebe5ef1493957ca6b1ff31d7037c0b3152a7a056c52383cdcd067d9b5ee8ac"
CHAT_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHAT = "/v1/chat/completions"


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + b64encode(image).decode()


def ask(content: Any, model: str = "smolv") -> dict[str, Any]:
    return {"model": model, "temperature": 0, "max_tokens": 4,
            "messages": [{"role": "user", "content": content}]}


def lock_doc(home: Path) -> dict[str, Any]:
    return tomllib.loads((home / "sovctl.lock").read_text())


def blob(home: Path, sha256: str) -> Path:
    return home / "store" / "blobs" / f"sha256-{sha256}"


# -- the pieces ----------------------------------------------------------------------------

def test_tags_are_parsed_from_any_list_shape() -> None:
    assert parse_tags("Cat, dog ,CAT,, sunset.\n- Beach\n2) sky\n") == (
        "cat", "dog", "sunset", "beach", "sky")
    assert parse_tags("Tags: red, 'square'") == ("red", "square")
    assert parse_tags("") == ()


def test_images_are_recognised_by_their_bytes() -> None:
    assert image_type(tiny_png()[:12]) == "image/png"
    assert image_type(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01") == "image/jpeg"
    assert image_type(b"GIF89a\x01\x00\x01\x00\x00\x00") == "image/gif"
    assert image_type(b"RIFF\x24\x00\x00\x00WEBP") == "image/webp"
    assert image_type(b"GGUF\x03\x00\x00\x00") is None


# -- pinning -------------------------------------------------------------------------------

def test_pull_mmproj_pins_verifies_lists_and_removes_both(sovctl_home: Path) -> None:
    home = sovctl_home
    doc = run_json(home, "pull", str(CHAT_MODEL), "--name", "smolv", "--mmproj", str(MMPROJ))
    assert doc["_rc"] == 0, doc["_stderr"]
    data = doc["data"]
    assert (data["action"], data["mmproj_action"]) == ("imported", "imported")
    assert data["entry"]["mmproj"]["sha256"] == MMPROJ_SHA
    pinned = lock_doc(home)
    assert pinned["version"] == 2  # a lock with a projector in it
    mmproj = pinned["models"]["smolv"]["mmproj"]
    assert mmproj == {"sha256": MMPROJ_SHA, "size": MMPROJ.stat().st_size, "source": "file",
                      # pull records the file as it resolves (the models folder may be a link)
                      "ref": str(MMPROJ.resolve()), "digest_from": "computed",
                      "path": str(MMPROJ.resolve())}
    assert blob(home, CHAT_SHA).is_file() and blob(home, MMPROJ_SHA).is_file()

    again = run_json(home, "pull", str(CHAT_MODEL), "--name", "smolv", "--mmproj", str(MMPROJ))
    assert (again["data"]["action"], again["data"]["transferred"]) == ("already-pinned", 0)

    verify = run_json(home, "verify", "smolv")
    assert verify["_rc"] == 0, verify["_stderr"]
    assert [(i["name"], i["status"], i["expected"]) for i in verify["data"]["items"]] == [
        ("smolv", "ok", CHAT_SHA), ("smolv/mmproj", "ok", MMPROJ_SHA)]

    # A second name for the same weights, without a projector: one blob, two pins.
    run(home, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    rows = {r["entry"]["name"]: r for r in run_json(home, "models")["data"]}
    assert rows["smolv"]["entry"]["mmproj"]["sha256"] == MMPROJ_SHA
    assert rows["smolv"]["mmproj_present"] is True
    assert rows["smol"]["entry"]["mmproj"] is None
    table = run(home, "models", check=True).stdout
    assert MMPROJ_SHA[:12] in table

    rm = run_json(home, "rm", "smolv")["data"]
    assert (rm["blob_removed"], rm["still_used_by"]) == (False, ["smol"])
    assert (rm["mmproj_sha256"], rm["mmproj_removed"]) == (MMPROJ_SHA, True)
    assert blob(home, CHAT_SHA).is_file() and not blob(home, MMPROJ_SHA).exists()
    assert lock_doc(home)["version"] == 1  # no projector left: readable by an older sovctl


def test_pull_mmproj_from_a_hub(sovctl_home: Path) -> None:
    with serve(catalog((CHAT_MODEL, MMPROJ))) as hub:
        doc = run_json(sovctl_home, "pull", "--endpoint", hub.url,
                       f"hf://{REPO}/{CHAT_MODEL.name}", "--name", "smolv",
                       "--mmproj", f"hf://{REPO}/{MMPROJ.name}")
    assert doc["_rc"] == 0, doc["_stderr"]
    assert doc["data"]["mmproj_action"] == "downloaded"
    mmproj = lock_doc(sovctl_home)["models"]["smolv"]["mmproj"]
    assert (mmproj["source"], mmproj["digest_from"], mmproj["sha256"]) == ("hf", "hub",
                                                                            MMPROJ_SHA)
    assert mmproj["repo"] == REPO and mmproj["path"] == MMPROJ.name and mmproj["commit"]


def test_pull_refuses_the_wrong_kind_of_file_and_stores_nothing(sovctl_home: Path) -> None:
    home = sovctl_home

    def stored() -> list[Path]:
        d = home / "store" / "blobs"
        return sorted(d.iterdir()) if d.is_dir() else []

    wrong = run(home, "pull", str(CHAT_MODEL), "--name", "smolv", "--mmproj", str(TINY_MODEL))
    assert wrong.returncode == 2, wrong.stderr
    assert "not a multimodal projector" in wrong.stderr and "'llama'" in wrong.stderr
    assert stored() == []

    # The projector comes in first and is fine; then the model is refused (it is a projector
    # too). Nothing half-written: the projector's blob went again, and no name was pinned.
    swapped = run(home, "pull", str(MMPROJ), "--name", "proj", "--mmproj", str(MMPROJ))
    assert swapped.returncode == 2, swapped.stderr
    assert "is a multimodal projector" in swapped.stderr and "--mmproj" in swapped.stderr
    assert stored() == []
    assert not (home / "sovctl.lock").exists() or lock_doc(home).get("models", {}) == {}


def test_a_tampered_projector_fails_verify_and_serve(sovctl_home: Path) -> None:
    home = sovctl_home
    run(home, "pull", str(CHAT_MODEL), "--name", "smolv", "--mmproj", str(MMPROJ), check=True)
    path = blob(home, MMPROJ_SHA)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    verify = run_json(home, "verify", "smolv")
    assert verify["_rc"] == 1
    items = {i["name"]: i for i in verify["data"]["items"]}
    assert items["smolv"]["status"] == "ok"
    assert items["smolv/mmproj"]["status"] == "mismatch"
    assert items["smolv/mmproj"]["actual"] == hashlib.sha256(bytes(data)).hexdigest()
    served = run(home, "serve", "--chat", "smolv", "-d")
    assert served.returncode == 5, served.stderr
    assert "projector blob" in served.stderr and "sovctl verify smolv" in served.stderr
    assert not (home / "run" / "state.json").exists()


def test_vision_is_planned_on_llama_server_only(sovctl_home: Path) -> None:
    home = sovctl_home
    run(home, "pull", str(CHAT_MODEL), "--name", "smolv", "--mmproj", str(MMPROJ), check=True)
    plan = run_json(home, "serve", "--chat", "smolv", "--dry-run")
    argv = plan["data"]["processes"][0]["argv"]
    assert argv[argv.index("--mmproj") + 1] == str(blob(home, MMPROJ_SHA))
    refused = run(home, "serve", "--chat", "smolv", "--dry-run",
                  env={"SOVCTL_SERVE__RUNTIME": "llama-cpp-python"})
    assert refused.returncode == 3, refused.stderr
    assert "vision needs the llama-server runtime" in refused.stderr


# -- through the gateway -------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """smolv reads images (SmolLM2 + the random projector); smol is the same weights without."""
    home = tmp_path_factory.mktemp("vision")
    run(home, "pull", str(CHAT_MODEL), "--name", "smolv", "--mmproj", str(MMPROJ), check=True)
    run(home, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    s = start_stack(home, "--chat", "smolv", "--chat", "smol", models=())
    yield s
    stop_stack(s)


class _Recorder(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[tuple[str, list[str]]]:
    """A web server on loopback that would serve an image, and records every request."""
    hits: ClassVar[list[str]] = []
    handler = type("Recorder", (_Recorder,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_an_image_reaches_the_model_through_the_gateway(stack: Stack) -> None:
    """The prompt grows by the image's tokens: the projector turned the image into embeddings
    the model read. Random weights: the answer itself means nothing."""
    text = {"type": "text", "text": "Describe this image."}
    image = {"type": "image_url", "image_url": {"url": data_url(tiny_png())}}
    with_image = httpx.post(stack.base + CHAT, json=ask([text, image]), timeout=120)
    assert with_image.status_code == 200, with_image.text
    without = httpx.post(stack.base + CHAT, json=ask([text]), timeout=120)
    assert without.status_code == 200, without.text
    grown = with_image.json()["usage"]["prompt_tokens"] - without.json()["usage"]["prompt_tokens"]
    assert grown > 0, (with_image.json()["usage"], without.json()["usage"])
    models = {m["id"]: m for m in httpx.get(stack.base + "/v1/models").json()["data"]}
    assert (models["smolv"]["capabilities"]["vision"],
            models["smol"]["capabilities"]["vision"]) == (True, False)


def test_a_remote_image_is_refused_and_never_fetched(stack: Stack,
                                                     image_host: tuple[str, list[str]]) -> None:
    url, hits = image_host
    for where in (url + "/x.png", url.replace("http:", "https:") + "/x.png"):
        r = httpx.post(stack.base + CHAT, timeout=30, json=ask([
            {"type": "text", "text": "tags?"}, {"type": "image_url", "image_url": {"url": where}}]))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages[0].content[1].image_url.url"
        assert "data URL" in err["message"] and "stays local" in err["message"]
    assert hits == []


def test_an_image_for_a_model_without_projector_is_refused(stack: Stack) -> None:
    r = httpx.post(stack.base + CHAT, timeout=30, json=ask(
        [{"type": "image_url", "image_url": {"url": data_url(tiny_png())}}], model="smol"))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "'smol'" in message and "served without a projector" in message
    assert "--mmproj" in message


def test_tag_command(stack: Stack, tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(tiny_png((200, 30, 30)))
    b.write_bytes(tiny_png((30, 30, 200)))
    doc = run_json(stack.home, "tag", str(a), str(b))
    assert doc["_rc"] == 0, doc["_stderr"]
    data = doc["data"]
    assert data["model"] == "smolv"  # the one served model with a projector
    assert [i["image"] for i in data["images"]] == [str(a), str(b)]
    for item in data["images"]:
        # Random projector: the tags are words, not a description of the image.
        assert isinstance(item["tags"], list) and all(isinstance(t, str) for t in item["tags"])
        assert item["prompt_tokens"] > 0 and item["completion_tokens"] > 0
    table = run(stack.home, "tag", str(a), "--prompt", "Name one colour.", "--max-tokens", "4")
    assert table.returncode == 0, table.stderr
    assert "a.png" in table.stdout and "smolv" in table.stdout

    refused = run(stack.home, "tag", str(a), "--model", "smol")
    assert refused.returncode == 2, refused.stderr
    assert "served without a projector" in refused.stderr


def test_tag_refuses_what_is_not_a_local_image(stack: Stack, tmp_path: Path) -> None:
    missing = run(stack.home, "tag", str(tmp_path / "nope.png"))
    assert missing.returncode == 4 and "no such file" in missing.stderr
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    wrong = run(stack.home, "tag", str(text))
    assert wrong.returncode == 2 and "is not a PNG, JPEG, WebP or GIF image" in wrong.stderr
    assert wrong.stderr.count("\n") == 1 and "Traceback" not in wrong.stderr


def test_tag_without_a_running_stack(sovctl_home: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(tiny_png())
    r = run(sovctl_home, "tag", str(image))
    assert r.returncode == 7 and "start one with sovctl serve" in r.stderr
