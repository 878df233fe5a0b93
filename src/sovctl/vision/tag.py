"""`sovctl tag`: tags for local image files from a vision model, through the running stack.

Each image is read here and sent inline, as a data URL, to this home's gateway: the image
goes nowhere else, and nothing is fetched from a URL on the way.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.apikey import read_api_key
from sovctl.errors import (
    ConfigError,
    NotFoundError,
    RuntimeStartError,
    SovctlError,
    UsageError,
)
from sovctl.home import Home
from sovctl.runtime import control

DEFAULT_PROMPT = ("List 5 to 10 short tags that describe this image, as one comma-separated "
                  "line. Answer with the tags only.")

# What the file starts with decides its type, never its name: a .png that is not one is refused
# here, with its path, instead of as a runtime's "failed to load image".
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
_LIST_MARK = re.compile(r"^(?:[-*\u2022]+|\d+[.)])\s*")
_LEAD_IN = re.compile(r"^\s*tags\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class ImageTags:
    image: str  # the path as given
    tags: tuple[str, ...]
    text: str  # the model's answer, as it came
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass(frozen=True)
class TagResult:
    model: str
    prompt: str
    images: tuple[ImageTags, ...]


def image_type(head: bytes) -> str | None:
    """The media type of PNG, JPEG, GIF and WebP data from its first bytes, else None."""
    for magic, media in _MAGIC:
        if head.startswith(magic):
            return media
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_url(path: Path) -> str:
    """The file as a base64 data URL; a missing file or one that is not an image is refused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {path}", hint="check the path") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}",
                         hint="pass image files (PNG, JPEG, WebP or GIF)") from None
    media = image_type(data[:12])
    if media is None:
        raise UsageError(f"{path} is not a PNG, JPEG, WebP or GIF image",
                         hint="convert it to PNG or JPEG first")
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def parse_tags(text: str) -> tuple[str, ...]:
    """Tags from a model's answer: split on commas and lines, list marks and quotes dropped,
    lower-cased, each once, in the order the model gave them."""
    tags: dict[str, None] = {}
    for piece in re.split(r"[,\n]", _LEAD_IN.sub("", text)):
        tag = _LIST_MARK.sub("", piece.strip()).strip(" \t\"'`.").lower()
        if tag:
            tags.setdefault(tag, None)
    return tuple(tags)


def _gateway(home: Home) -> tuple[str, dict[str, str]]:
    """The running stack's API base URL (http://host:port/v1) and the headers it needs."""
    st = control.status(home)
    if not st.running or not st.url:
        raise RuntimeStartError(f"no sovctl stack is running from {home.root}",
                                hint="start one with sovctl serve --chat NAME -d, NAME pulled "
                                "with --mmproj")
    if not st.api_key_required:
        return st.url, {}
    key = read_api_key(home)
    if key is None:
        raise ConfigError("the gateway requires an API key, and this home has none",
                          hint="restart the stack with 'sovctl stop' then 'sovctl serve'")
    return st.url, {"Authorization": f"Bearer {key}"}


def _refused(what: str, status: int, body: Any) -> SovctlError:
    """The gateway's error answer as the error of this command, its message kept."""
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    text = f"{what}: the gateway answered {status}: {message or 'no error message'}"
    if status == 404:
        return NotFoundError(text, hint="see the served models with 'sovctl status'")
    if status == 413:
        return UsageError(text, hint="an image must fit [serve] max_body_bytes once "
                          "base64-encoded (4/3 of its size); send a smaller one")
    if 400 <= status < 500:
        return UsageError(text, hint="see 'sovctl tag --help'")
    return RuntimeStartError(text, hint="see 'sovctl status' and 'sovctl logs'")


def _vision_model(client: Any, base: str, headers: dict[str, str]) -> str:
    """The first served chat model that reads images."""
    r = client.get(f"{base}/models", headers=headers)
    body = r.json()
    if r.status_code != 200:
        raise _refused("listing the models", r.status_code, body)
    for m in body["data"]:
        if m.get("role") == "chat" and (m.get("capabilities") or {}).get("vision"):
            return str(m["id"])
    raise NotFoundError("no served chat model reads images",
                        hint="pull one with its projector ('sovctl pull REF --mmproj "
                        "PROJECTOR'), serve it, or name one with --model")


def tag(
    home: Home,
    images: Sequence[Path],
    model: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 64,
    timeout: float = 300.0,
) -> TagResult:
    """One chat request per image, at temperature 0, through the running stack's gateway."""
    import httpx

    if not images:
        raise UsageError("no image to tag", hint="pass one or more image files")
    # Every file is read before the first request: a typo in the last path fails at once.
    urls = [data_url(p) for p in images]
    base, headers = _gateway(home)
    results = []
    # trust_env=False: a proxy setting must never route these images off the machine.
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        try:
            chosen = model or _vision_model(client, base, headers)
            for path, url in zip(images, urls, strict=True):
                t0 = time.perf_counter()
                r = client.post(f"{base}/chat/completions", headers=headers, json={
                    "model": chosen, "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": prompt},
                    ]}],
                })
                body = r.json()
                if r.status_code != 200:
                    raise _refused(str(path), r.status_code, body)
                text = body["choices"][0]["message"]["content"] or ""
                usage = body.get("usage") or {}
                results.append(ImageTags(
                    str(path), parse_tags(text), text, int(usage.get("prompt_tokens", 0)),
                    int(usage.get("completion_tokens", 0)), time.perf_counter() - t0))
        except httpx.HTTPError as e:
            raise RuntimeStartError(f"the gateway at {base} did not answer: {e}",
                                    hint="see 'sovctl status' and 'sovctl logs gateway'") from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeStartError(f"the gateway at {base} sent an answer that is not an "
                                    f"OpenAI chat answer ({type(e).__name__}: {e})",
                                    hint="see 'sovctl logs gateway'") from None
    return TagResult(chosen, prompt, tuple(results))
