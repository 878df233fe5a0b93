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
from sovctl.fsutil import fsync_path
from sovctl.home import Home

# Large enough that the per-buffer costs (a system call each way, a hand-off to the hashing
# thread) vanish; from 256 KiB to 8 MiB, hashing and copying measured the same.
CHUNK = 4 * 1024 * 1024
# Buffers in flight while copying: one being read and written, the others queued for hashing.
_RING = 4
GGUF_MAGIC = b"GGUF"

Progress = Callable[[int], None]

def _read_ahead(f: BinaryIO) -> None:
    # A larger kernel read-ahead for a file read once, start to end (helps when it is not cached).
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """sha256 and length of a file, read once into one reused buffer."""
    h = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    total = 0
    with path.open("rb", buffering=0) as f:
        _read_ahead(f)
        while n := f.readinto(view):
            h.update(view[:n])
            total += n
            if progress:
                progress(n)
    return h.hexdigest(), total


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
                while chunk := f.read(CHUNK):
                    self._hash.update(chunk)
                    self._see_head(chunk)
                    self.size += len(chunk)
        self._file = path.open("ab" if resume else "wb")

    def _see_head(self, chunk: bytes | memoryview) -> None:
        """Refuse anything that does not start with the GGUF magic, before storing more of it."""
        if len(self._head) < len(GGUF_MAGIC):
            self._head += bytes(chunk[: len(GGUF_MAGIC) - len(self._head)])
            if not GGUF_MAGIC.startswith(self._head):
                raise IntegrityError(
                    f"not a GGUF file (starts with {self._head!r}, expected {GGUF_MAGIC!r})",
                    hint="point at a .gguf file; sovctl stores GGUF weights only",
                )

    def _advance(self, n: int) -> None:
        self.size += n
        if self.progress:
            self.progress(n)

    def write(self, chunk: bytes) -> None:
        self._see_head(chunk)
        self._file.write(chunk)
        self._hash.update(chunk)
        self._advance(len(chunk))

    def copy_from(self, src: BinaryIO) -> None:
        """Append everything left in `src`, reading it once.

        Each buffer is hashed by a helper thread while this one writes it and reads the next:
        hashing (the GIL released) and copying then take two cores instead of adding up. A
        buffer is refilled only after its hash is done, so the digest covers exactly the bytes
        written.
        """
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor
        from itertools import cycle

        _read_ahead(src)
        ring = [memoryview(bytearray(CHUNK)) for _ in range(_RING)]
        hashed: deque[Future[None]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sovctl-hash") as hasher:
            for buf in cycle(ring):
                if len(hashed) == _RING:
                    hashed.popleft().result()  # the hash of this buffer's previous bytes
                n = src.readinto(buf)  # type: ignore[attr-defined]
                if not n:
                    break
                view = buf[:n]
                self._see_head(view)
                self._file.write(view)
                hashed.append(hasher.submit(self._hash.update, view))
                self._advance(n)
            for done in hashed:
                done.result()

    def close(self) -> None:
        """Stop writing and keep the bytes, durably, for a later run to resume from."""
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def finish(self) -> tuple[str, int]:
        """The digest and length of every byte written. The bytes reach the disk only when
        `BlobStore.adopt` syncs them, once they matched."""
        self._file.close()
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
        """Move a fully hashed and matched partial file into the store, read-only, durably:
        its bytes reach the disk before its name does, and the name before this returns."""
        self.home.ensure(self.home.blobs)
        fsync_path(partial)
        os.chmod(partial, 0o444)
        dest = self.path(sha256)
        os.replace(partial, dest)
        fsync_path(dest.parent)
        return dest

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
