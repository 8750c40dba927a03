"""PNG encoding on several cores: the last step of every PNG request, on its critical path.

Why not Pillow's (or libspng's) encoder: both compress on one thread, and a 1024x1024
image of a diffusion model (fine texture, little for deflate to find) then takes about a
quarter of a second at the default level, more than the rest of the mesh adds to a
request. PNG's data is one zlib stream of filtered scanlines, and a deflate stream may be
cut into pieces compressed apart (each piece ends on a byte boundary with a sync flush,
the last one with the final block), which is how parallel gzip tools work too. So:
- each scanline gets the "Up" filter (its difference to the row above, one numpy
  subtraction; the first row's "above" is zeros, as the PNG standard says), which costs
  nothing and helps deflate on smooth images;
- the filtered rows are cut into stripes, each deflated at `level` on a thread of a
  shared pool (zlib releases the GIL), and joined under one zlib header and the Adler-32
  of the whole;
- one IHDR, one IDAT, one IEND chunk, each with its CRC-32.
The result is an ordinary 8-bit RGB (or RGBA, or grey) PNG that any decoder reads; the
tests decode it with Pillow and compare every pixel.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_LEVEL = 1
"""zlib level: 1 compresses a model's images nearly as well as 6, several times faster."""
MIN_STRIPE_BYTES = 256 * 1024
"""Stripes smaller than this are not worth a thread (and each restarts deflate's window)."""
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
_FILTER_UP = 2

_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="png")
    return _pool


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF)
    )


def _deflate(piece: memoryview, level: int, last: bool) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the header is ours
    return c.compress(piece) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """[H, 1 + W*C] uint8: each row's filter byte (Up), then its difference to the row above."""
    h, w = pixels.shape[:2]
    flat = pixels.reshape(h, -1)
    out = np.empty((h, 1 + flat.shape[1]), dtype=np.uint8)
    out[:, 0] = _FILTER_UP
    out[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=out[1:, 1:])  # uint8 arithmetic wraps, as PNG's
    return out


def encode_png(pixels: np.ndarray, level: int = DEFAULT_LEVEL, stripes: int = 0) -> bytes:
    """An 8-bit PNG of `pixels` ([H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA, uint8).

    `stripes`: how many pieces to deflate apart (0: one per worker thread, fewer for
    small images)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG encoding takes uint8 pixels, not {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOR_TYPE or 0 in pixels.shape[:2]:
        raise ValueError(f"PNG encoding takes [H, W], [H, W, 3] or [H, W, 4]; got {pixels.shape}")
    h, w, channels = pixels.shape
    raw = filtered_rows(np.ascontiguousarray(pixels))
    n = stripes or min(_workers(), max(1, raw.nbytes // MIN_STRIPE_BYTES))
    n = max(1, min(n, h))
    bounds = [round(i * h / n) for i in range(n + 1)]
    view = memoryview(raw).cast("B")
    row = raw.shape[1]
    pieces = [view[a * row : b * row] for a, b in zip(bounds, bounds[1:], strict=False)]
    if n == 1:
        deflated = [_deflate(pieces[0], level, True)]
    else:
        futures = [_executor().submit(_deflate, p, level, i == n - 1) for i, p in enumerate(pieces)]
        deflated = [f.result() for f in futures]
    adler = zlib.adler32(view) & 0xFFFFFFFF
    stream = b"\x78\x01" + b"".join(deflated) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[channels], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
