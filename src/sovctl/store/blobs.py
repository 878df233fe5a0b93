"""Content-addressed blobs: a file's name in the store is its sha256, and nothing else.

A blob only ever appears under blobs/ after its bytes were hashed and matched; until then
they live in partial/, where an interrupted download can resume.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from sovctl.errors import IntegrityError
from sovctl.home import Home

CHUNK = 4 * 1024 * 1024
GGUF_MAGIC = b"GGUF"

Progress = Callable[[int], None]


def hash_stream(f: BinaryIO, progress: Progress | None = None) -> tuple[str, int]:
    """sha256 and length of everything left in `f`, read once in large chunks."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while n := f.readinto(view):  # type: ignore[attr-defined]
        h.update(view[:n])
        total += n
        if progress:
            progress(n)
    return h.hexdigest(), total


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    with path.open("rb", buffering=0) as f:
        return hash_stream(f, progress)


class HashingWriter:
    """Appends to a partial file and hashes each byte as it passes: one pass over the data.

    On resume, the bytes already on disk are hashed first (they were never hashed by this
    process), then new bytes continue the same digest.
    """

    def __init__(self, path: Path, resume: bool, progress: Progress | None = None) -> None:
        self.path = path
        self.progress = progress
        self._hash = hashlib.sha256()
        self.size = 0
        self._head = b""
        if resume and path.exists():
            with path.open("rb", buffering=0) as f:
                while n := f.read(CHUNK):
                    self._hash.update(n)
                    self._see_head(n)
                    self.size += len(n)
            self._check_magic()
        self._file = path.open("ab" if resume else "wb")

    def _see_head(self, chunk: bytes) -> None:
        if len(self._head) < len(GGUF_MAGIC):
            self._head += chunk[: len(GGUF_MAGIC) - len(self._head)]

    def _check_magic(self) -> None:
        if len(self._head) >= len(GGUF_MAGIC) and self._head != GGUF_MAGIC:
            raise IntegrityError(
                f"not a GGUF file (starts with {self._head!r}, expected {GGUF_MAGIC!r})",
                hint="point at a .gguf file; sovctl stores GGUF weights only",
            )

    def write(self, chunk: bytes) -> None:
        if len(self._head) < len(GGUF_MAGIC):
            self._see_head(chunk)
            self._check_magic()
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)
        if self.progress:
            self.progress(len(chunk))

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def finish(self) -> tuple[str, int]:
        self.close()
        if self.size < len(GGUF_MAGIC):
            raise IntegrityError(
                f"not a GGUF file ({self.size} bytes, shorter than the GGUF magic)",
                hint="point at a .gguf file; sovctl stores GGUF weights only",
            )
        return self._hash.hexdigest(), self.size


class BlobStore:
    def __init__(self, home: Home) -> None:
        self.home = home

    def path(self, sha256: str) -> Path:
        return self.home.blobs / f"sha256-{sha256}"

    def has(self, sha256: str, size: int | None = None) -> bool:
        try:
            st = self.path(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def partial(self, key: str) -> Path:
        return self.home.partials / f"{key}.part"

    def adopt(self, partial: Path, sha256: str) -> Path:
        """Move a fully hashed and matched partial file into the store, read-only."""
        self.home.ensure(self.home.blobs)
        os.chmod(partial, 0o444)
        dest = self.path(sha256)
        os.replace(partial, dest)
        return dest

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
