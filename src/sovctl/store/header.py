"""A model's GGUF header, from a local file or from a Hub by HTTP range requests.

`sovctl plan` must size a model before a 20 GB download. The header is parsed by the store's
one GGUF header walk (`sovctl.store.gguf_header.read_header`), which reads a file through its
`stat()` and `open()`; a remote file is given those two methods here, and its `read()` is
served by range requests against the resolve URL in growing chunks (1 MiB first, doubling): a
header with a 150k-token vocabulary takes a few MiB, never the tensor data.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sovctl.errors import IntegrityError, NetworkError, NotFoundError
from sovctl.store.gguf_header import read_header

FIRST_CHUNK = 1 << 20
MAX_CHUNK = 16 << 20
MAX_HEADER = 256 << 20  # a header past this is not one a model file has


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the input width of a weight matrix
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ModelHeader:
    source: str
    file_size: int
    metadata: Mapping[str, Any]  # scalars and strings; an array is `...` (present, not read)
    tensors: tuple[Tensor, ...]
    fetched_bytes: int  # bytes that crossed the network to parse it (0 for a local file)
    requests: int  # HTTP range requests (0 for a local file)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _RangeReader:
    """A file-like sequential reader over HTTP range requests (what `read_header` calls)."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.pos = 0

    def __enter__(self) -> _RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, n: int) -> bytes:
        self.remote.ensure(self.pos + n)
        data = bytes(self.remote.buf[self.pos:self.pos + n])
        self.pos += len(data)
        return data


class RemoteFile:
    """The two methods of a Path that `read_header` uses, for a file behind a URL."""

    def __init__(self, url: str, label: str, size: int | None, token: str | None) -> None:
        import httpx

        self.url, self.label, self.size = url, label, size
        headers = {"Accept-Encoding": "identity", "User-Agent": "sovctl"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(follow_redirects=True, headers=headers,
                                    timeout=httpx.Timeout(30.0, read=60.0))
        self.buf = bytearray()
        self.chunk = FIRST_CHUNK
        self.requests = 0

    def stat(self) -> Any:
        if self.size is None:
            self.ensure(1)  # the first answer's Content-Range names the size
        return types.SimpleNamespace(st_size=self.size)

    def open(self, mode: str = "rb") -> _RangeReader:
        return _RangeReader(self)

    def ensure(self, end: int) -> None:
        while len(self.buf) < end and (self.size is None or len(self.buf) < self.size):
            if len(self.buf) >= MAX_HEADER:
                raise IntegrityError(f"{self.label}: the GGUF header runs past "
                                     f"{MAX_HEADER >> 20} MiB; not a model file sovctl can size")
            start = len(self.buf)
            want = max(self.chunk, end - start)
            if self.size is not None:
                want = min(want, self.size - start)
            self.buf += self._fetch(start, want)
            self.chunk = min(self.chunk * 2, MAX_CHUNK)

    def _fetch(self, start: int, length: int) -> bytes:
        import httpx

        self.requests += 1
        try:
            with self._client.stream(
                    "GET", self.url, headers={"Range": f"bytes={start}-{start + length - 1}"}) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"{self.url} answered 404 Not Found")
                if r.status_code != 206:
                    raise NetworkError(
                        f"{self.url} answered HTTP {r.status_code} to a range request"
                        + (" (it would send the whole file)" if r.status_code == 200 else ""),
                        hint="this endpoint cannot serve a header alone: pull the model, then "
                        "run 'sovctl plan NAME' on the local copy")
                total = r.headers.get("Content-Range", "").rsplit("/", 1)[-1]
                if self.size is None and total.isdigit():
                    self.size = int(total)
                data = r.read()
        except httpx.TransportError as e:
            raise NetworkError(f"reading the GGUF header from {self.url} failed: "
                               f"{type(e).__name__}: {e}",
                               hint="check the endpoint (--endpoint) and the network") from None
        if not data:
            raise IntegrityError(f"{self.label}: the file ends at byte {start}, inside its "
                                 "GGUF header")
        return data[:length]

    def close(self) -> None:
        self._client.close()


def _keep(key: str) -> bool:
    return not key.startswith("tokenizer.")  # the vocabulary is not needed to size a model


def _parse(path: Path | RemoteFile, label: str, size: int) -> ModelHeader:
    try:
        h = read_header(cast(Path, path), _keep)
    except (ValueError, KeyError, OSError) as e:
        raise IntegrityError(f"{label}: not a valid GGUF file, or its header is truncated "
                             f"({type(e).__name__}: {e})",
                             hint="pass a complete .gguf model file") from None
    tensors = tuple(Tensor(t.name, t.dims, t.elements, t.nbytes) for t in h.tensors)
    fetched, requests = (len(path.buf), path.requests) if isinstance(path, RemoteFile) else (0, 0)
    return ModelHeader(label, size, h.kv, tensors, fetched, requests)


def read_local(path: Path, label: str | None = None) -> ModelHeader:
    return _parse(path, label or str(path), path.stat().st_size)


def read_remote(url: str, label: str, size: int | None, token: str | None = None
                ) -> ModelHeader:
    remote = RemoteFile(url, label, size, token)
    try:
        real_size = remote.stat().st_size
        if real_size is None:
            raise NetworkError(f"{url} did not say how large the file is",
                               hint="pull the model, then run 'sovctl plan NAME'")
        return _parse(remote, label, int(real_size))
    finally:
        remote.close()
