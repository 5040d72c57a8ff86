"""Small hostile or odd files the robustness tests write."""

from __future__ import annotations

import struct
import zlib


def png_declaring(path, width: int, height: int):
    """A tiny PNG whose header declares ``width x height`` (PIL refuses a huge one before decoding a pixel)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path
