"""The forms of REF that `sovctl pull` accepts, parsed into typed references."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from sovctl.errors import NotFoundError, UsageError

_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
# Matched whole (fullmatch): "$" with match would also accept a trailing newline.
_HF = re.compile(rf"hf://(?P<repo>{_REPO})/(?P<path>[^?#]+\.gguf)", re.IGNORECASE)
_QUANT = re.compile(rf"(?P<repo>{_REPO}):(?P<quant>[A-Za-z0-9._-]+)")

FORMS = (
    "hf://ORG/REPO/PATH/FILE.gguf, ORG/REPO:QUANT, a local path or file:// URL, "
    "or an https:// URL with --sha256"
)


@dataclass(frozen=True)
class HubFile:
    repo: str
    path: str


@dataclass(frozen=True)
class HubQuant:
    repo: str
    quant: str


@dataclass(frozen=True)
class LocalFile:
    path: Path


@dataclass(frozen=True)
class Url:
    url: str


Ref = HubFile | HubQuant | LocalFile | Url


def parse_ref(ref: str) -> Ref:
    if ref.startswith("hf://"):
        m = _HF.fullmatch(ref)
        if not m or any(part in ("", ".", "..") for part in m["path"].split("/")):
            raise UsageError(
                f"bad hub reference {ref!r}", hint="expected hf://ORG/REPO/PATH/FILE.gguf"
            )
        return HubFile(repo=m["repo"], path=m["path"])
    if ref.startswith("file://"):
        return _local(Path(unquote(urlparse(ref).path)), ref)
    if ref.startswith(("https://", "http://")):
        if not urlparse(ref).hostname:
            raise UsageError(f"bad URL {ref!r}", hint=f"REF forms: {FORMS}")
        return Url(url=ref)
    if "://" in ref:
        raise UsageError(f"unsupported scheme in {ref!r}", hint=f"REF forms: {FORMS}")
    path = Path(ref).expanduser()
    if path.exists():
        return _local(path, ref)
    m = _QUANT.fullmatch(ref)
    if m:
        return HubQuant(repo=m["repo"], quant=m["quant"])
    if ref.lower().endswith(".gguf") or ref.startswith(("/", ".", "~")):
        raise NotFoundError(f"no such file: {ref}", hint="check the path")
    raise UsageError(f"cannot understand REF {ref!r}", hint=f"REF forms: {FORMS}")


def _local(path: Path, ref: str) -> LocalFile:
    if not path.is_file():
        raise NotFoundError(f"no such file: {ref}", hint="check the path")
    return LocalFile(path=path.resolve())
