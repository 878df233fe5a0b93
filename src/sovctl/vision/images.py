"""Images made in code: a fixed, tiny PNG for requests that must be identical everywhere."""

from __future__ import annotations

import struct
import zlib


def tiny_png(rgb: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    """A small plain-colour RGB PNG, written by hand so that a fixed image request is the same
    bytes on every machine, with no imaging library."""
    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
