"""Read a GGUF header (metadata and tensor table) without the tensor data.

`sovctl plan` must size a model before a 20 GB download, so the header is read from a byte
source that fetches only what the parser asks for: a local file, or HTTP Range requests against
a Hub endpoint's resolve URL (growing chunks, 1 MiB first; a header with a large vocabulary is a
few MiB). The `gguf` package's reader maps a whole file, which a remote file is not; this
parser follows the same format (GGUF v2 and v3, either byte order) and keeps only what sizing
needs: scalar metadata, short arrays, the length of every array, and each tensor's name, element
count, type and size in bytes (from the `gguf` package's table of block sizes).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from sovctl.errors import IntegrityError, NetworkError, NotFoundError

FIRST_CHUNK = 1 << 20
MAX_CHUNK = 16 << 20
MAX_HEADER = 256 << 20  # a header past this is not one a model file has
SHORT_ARRAY = 4096  # arrays up to this length are kept (per-layer values); longer ones counted

# GGUF value types -> struct codes; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


class ByteSource(Protocol):
    label: str
    size: int | None

    def fetch(self, start: int, length: int) -> bytes:
        """Up to `length` bytes from `start` (fewer only at the end of the file)."""
        ...


class FileSource:
    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = path
        self.label = label or str(path)
        self.size: int | None = path.stat().st_size
        self._f: BinaryIO | None = None

    def fetch(self, start: int, length: int) -> bytes:
        if self._f is None:
            self._f = self.path.open("rb")
        self._f.seek(start)
        return self._f.read(length)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class RangeSource:
    """Bytes of a remote file by HTTP Range requests, over one keep-alive connection."""

    def __init__(self, url: str, label: str, size: int | None, token: str | None = None
                 ) -> None:
        import httpx

        self.url, self.label, self.size = url, label, size
        headers = {"Accept-Encoding": "identity", "User-Agent": "sovctl"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(follow_redirects=True, headers=headers,
                                    timeout=httpx.Timeout(30.0, read=60.0))
        self.requests = 0
        self.received = 0

    def fetch(self, start: int, length: int) -> bytes:
        import httpx

        if self.size is not None:
            length = min(length, self.size - start)
            if length <= 0:
                return b""
        self.requests += 1
        try:
            with self._client.stream(
                    "GET", self.url, headers={"Range": f"bytes={start}-{start + length - 1}"}) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"{self.url} answered 404 Not Found")
                if r.status_code == 416:
                    return b""
                if r.status_code != 206:
                    raise NetworkError(
                        f"{self.url} answered HTTP {r.status_code} to a range request"
                        + (" (it would send the whole file)" if r.status_code == 200 else ""),
                        hint="this endpoint cannot serve a header alone: pull the model, then "
                        "run 'sovctl plan NAME' on the local copy")
                data = r.read()
        except httpx.TransportError as e:
            raise NetworkError(f"reading the GGUF header from {self.url} failed: "
                               f"{type(e).__name__}: {e}",
                               hint="check the endpoint (--endpoint) and the network") from None
        self.received += len(data)
        return data[:length]

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    n_elements: int
    ggml_type: int
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    source: str
    file_size: int | None
    header_bytes: int  # bytes the metadata and the tensor table take
    fetched_bytes: int  # bytes read from the source to parse them
    version: int
    metadata: Mapping[str, Any]  # scalars and arrays of up to SHORT_ARRAY items
    array_lengths: Mapping[str, int]
    tensors: tuple[TensorInfo, ...]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, src: ByteSource) -> None:
        self.src = src
        self.buf = bytearray()
        self.pos = 0
        self.chunk = FIRST_CHUNK
        self.endian = "<"

    def need(self, n: int) -> None:
        end = self.pos + n
        while len(self.buf) < end:
            if len(self.buf) >= MAX_HEADER:
                raise IntegrityError(f"{self.src.label}: the GGUF header runs past "
                                     f"{MAX_HEADER >> 20} MiB; this is not a model file sovctl "
                                     "can size")
            want = min(max(self.chunk, end - len(self.buf)), MAX_HEADER)
            data = self.src.fetch(len(self.buf), want)
            if not data:
                raise IntegrityError(f"{self.src.label}: the GGUF header is truncated "
                                     f"(file ends at byte {len(self.buf)})",
                                     hint="the file is incomplete or not a GGUF file")
            self.buf += data
            self.chunk = min(self.chunk * 2, MAX_CHUNK)

    def scalar(self, code: str) -> Any:
        size = struct.calcsize(code)
        self.need(size)
        (v,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        code = self.endian + "Q"
        for _ in range(count):
            self.need(8)
            (n,) = struct.unpack_from(code, self.buf, self.pos)
            self.pos += 8
            self.need(n)
            self.pos += n

    def value(self, vtype: int, key: str, lengths: dict[str, int]) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise IntegrityError(f"{self.src.label}: unknown GGUF value type {vtype} for {key}")
        etype, count = self.scalar("I"), self.scalar("Q")
        lengths[key] = count
        if count <= SHORT_ARRAY:
            return [self.value(etype, key + "[]", lengths) for _ in range(count)]
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype]) * count
            self.need(size)
            self.pos += size
        elif etype == _STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.value(etype, key + "[]", lengths)
        return None


def tensor_bytes(ggml_type: int, n_elements: int, label: str, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise IntegrityError(f"{label}: tensor {name} has a type ({ggml_type}) this gguf "
                             "package does not know", hint="upgrade the gguf package") from None
    return n_elements // block * size


def read_header(src: ByteSource) -> GgufHeader:
    c = _Cursor(src)
    c.need(4)
    if bytes(c.buf[:4]) != b"GGUF":
        raise IntegrityError(f"{src.label}: not a GGUF file (it starts with "
                             f"{bytes(c.buf[:4])!r})", hint="pass a .gguf model file")
    c.pos = 4
    version = c.scalar("I")
    if version & 0xFFFF == 0 and version:  # written on a big-endian machine
        c.endian = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise IntegrityError(f"{src.label}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.scalar("Q"), c.scalar("Q")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.scalar("I"), key, lengths)
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar("I")
        n = 1
        for _ in range(n_dims):
            n *= c.scalar("Q")
        ggml_type = c.scalar("I")
        c.scalar("Q")  # offset into the data section
        tensors.append(TensorInfo(name, n, ggml_type, tensor_bytes(ggml_type, n, src.label, name)))
    return GgufHeader(
        source=src.label, file_size=src.size, header_bytes=c.pos, fetched_bytes=len(c.buf),
        version=version, metadata=metadata, array_lengths=lengths, tensors=tuple(tensors),
    )


def read_local(path: Path, label: str | None = None) -> GgufHeader:
    src = FileSource(path, label)
    try:
        return read_header(src)
    finally:
        src.close()


def read_remote(url: str, label: str, size: int | None, token: str | None = None
                ) -> tuple[GgufHeader, int]:
    """The header, and how many range requests it took."""
    src = RangeSource(url, label, size, token)
    try:
        return read_header(src), src.requests
    finally:
        src.close()
