"""The size an image declares, read from its header alone.

A runtime decodes an image whole before it scales it down for the model: a PNG of a few
kilobytes that declares 16384x16384 pixels costs it a gigabyte. The gateway reads the declared
width and height first, from the header bytes of each format a client may send, without
decoding a pixel; a format it cannot read is one it cannot bound, and is refused.
"""

from __future__ import annotations

import struct

PNG = b"\x89PNG\r\n\x1a\n"
# JPEG markers that start a frame and carry its size: SOF0-3, 5-7, 9-11, 13-15 (0xC4 is DHT,
# 0xC8 JPG, 0xCC DAC).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM, RST0-7, SOI.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_SOS = 0xDA  # the scan begins: a frame header must have come before


class ImageError(ValueError):
    """The bytes are not an image of a known format, or its header is cut short or broken."""


def dimensions(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as the image's header declares them. Raises ImageError when the
    format is unknown or the header is broken."""
    try:
        if data.startswith(PNG):
            return _png(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack_from("<HH", data, 6)
            return "gif", width, height
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
        if data[:2] == b"BM":
            return _bmp(data)
    except (struct.error, IndexError):
        raise ImageError("its header is cut short") from None
    raise ImageError("it is not a PNG, JPEG, GIF, WebP or BMP image")


def _png(data: bytes) -> tuple[str, int, int]:
    if data[12:16] != b"IHDR":
        raise ImageError("its PNG header (IHDR) is missing")
    width, height = struct.unpack_from(">II", data, 16)
    return "png", width, height


def _jpeg(data: bytes) -> tuple[str, int, int]:
    at = 2
    while True:
        if data[at] != 0xFF:
            raise ImageError("its JPEG segments are broken")
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
            continue
        if marker in _JPEG_BARE:
            at += 2
            continue
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return "jpeg", width, height
        if marker == _JPEG_SOS:
            raise ImageError("its JPEG frame header is missing")
        (length,) = struct.unpack_from(">H", data, at + 2)
        if length < 2:
            raise ImageError("its JPEG segments are broken")
        at += 2 + length


def _webp(data: bytes) -> tuple[str, int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: the frame header after a 3-byte tag and a start code
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("its WebP frame header is broken")
        width, height = struct.unpack_from("<HH", data, 26)
        return "webp", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: a signature byte, then 14-bit width-1 and height-1
        if data[20] != 0x2F:
            raise ImageError("its WebP header is broken")
        (bits,) = struct.unpack_from("<I", data, 21)
        return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24-bit width-1 and height-1
        if len(data) < 30:
            raise ImageError("its header is cut short")
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return "webp", width, height
    raise ImageError("its WebP chunk is of no known kind")


def _bmp(data: bytes) -> tuple[str, int, int]:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack_from("<HH", data, 18)
        return "bmp", width, height
    width, height = struct.unpack_from("<ii", data, 18)
    return "bmp", abs(width), abs(height)  # a negative height is a top-down bitmap
