"""A local Hugging Face compatible hub for tests: sovctl's own mirror server, serving a catalog
built from the shared model files under a made-up repo name and commit, on 127.0.0.1.

The handler subclasses alter the network the way the real world does: bytes changed in transit
(same size, so a size check alone passes), a connection that drops mid-file, a slow link.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO, ClassVar

from tests.conftest import CHAT_MODEL, EMBED_MODEL, TINY_MODEL

from sovctl.store.mirror import Catalog, MirrorFile, MirrorHandler, make_server

REPO = "sovtest/tiny-models"
COMMIT = "5f0c3a1e9b7d2468ace013579bdf2468ace01357"  # 40 hex, like a git commit sha
PULLED_AT = "2024-01-01T00:00:00Z"

# The published digests of the shared models (../shared/models/MODELS.md).
KNOWN_SHA256 = {
    TINY_MODEL.name: "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d",
    CHAT_MODEL.name: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    EMBED_MODEL.name: "7e01259cec4346ed6884939d130b8b103472ab310dc296a60cf1349d90e5541a",
}


@cache
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def catalog(
    files: tuple[Path, ...] = (TINY_MODEL, CHAT_MODEL, EMBED_MODEL),
    repo: str = REPO,
    commit: str = COMMIT,
) -> Catalog:
    """The shared model files as one repo at one commit, on branch main."""
    return Catalog([
        MirrorFile(repo, "main", commit, p.name, sha256_of(p), p.stat().st_size, p, PULLED_AT)
        for p in files
    ])


class Counting(MirrorHandler):
    """Records every file body it starts to send: (path, first byte)."""

    bodies: ClassVar[list[tuple[str, int]]]

    def body_chunks(self, f: MirrorFile, src: BinaryIO, start: int, end: int) -> Iterator[bytes]:
        self.bodies.append((f.path, start))
        yield from super().body_chunks(f, src, start, end)


class AlteredBytes(MirrorHandler):
    """Flips one byte in the middle of the file: same size, different content."""

    def body_chunks(self, f: MirrorFile, src: BinaryIO, start: int, end: int) -> Iterator[bytes]:
        middle = f.size // 2
        pos = start
        for chunk in super().body_chunks(f, src, start, end):
            if pos <= middle < pos + len(chunk):
                b = bytearray(chunk)
                b[middle - pos] ^= 0xFF
                chunk = bytes(b)
            pos += len(chunk)
            yield chunk


class DropsMidFile(MirrorHandler):
    """Sends the first half of the file, then drops the connection."""

    def body_chunks(self, f: MirrorFile, src: BinaryIO, start: int, end: int) -> Iterator[bytes]:
        src.seek(start)
        yield src.read(max(f.size // 2 - start, 1))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class Slow(Counting):
    """Sends 64 KiB every 50 ms, so that two clients overlap for sure."""

    def body_chunks(self, f: MirrorFile, src: BinaryIO, start: int, end: int) -> Iterator[bytes]:
        self.bodies.append((f.path, start))
        src.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = src.read(min(64 * 1024, left))
            left -= len(chunk)
            yield chunk
            time.sleep(0.05)


@dataclass
class Hub:
    url: str  # the endpoint, http://127.0.0.1:PORT
    bodies: list[tuple[str, int]]  # file bodies sent, with a Counting handler

    def resolve_url(self, filename: str, rev: str = COMMIT) -> str:
        return f"{self.url}/{REPO}/resolve/{rev}/{filename}"


@contextmanager
def serve(
    cat: Catalog | None = None,
    handler: type[MirrorHandler] = MirrorHandler,
    token: str | None = None,
) -> Iterator[Hub]:
    """Run a hub on 127.0.0.1 (a free port) in a thread. Leaving the block stops it for real:
    open keep-alive connections (huggingface_hub pools them) are cut too."""
    bodies: list[tuple[str, int]] = []
    conns: set[socket.socket] = set()

    class Tracked(handler):
        def setup(self) -> None:
            super().setup()
            conns.add(self.connection)

        def finish(self) -> None:
            conns.discard(self.connection)
            super().finish()

    Tracked.__name__ = handler.__name__
    if issubclass(handler, Counting):
        Tracked.bodies = bodies
    server = make_server(cat or catalog(), "127.0.0.1", 0, token=token, handler=Tracked)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Hub(f"http://127.0.0.1:{server.server_address[1]}", bodies)
    finally:
        server.shutdown()
        server.server_close()
        for conn in list(conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=10)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
