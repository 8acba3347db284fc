"""Small builders for test data: real image files and zips, made on the fly."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from PIL import Image


def image_bytes(
    size: tuple[int, int] = (16, 16), *, mode: str = "RGB", color: object = (200, 30, 30), fmt: str = "PNG"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)  # type: ignore[arg-type]
    return buffer.getvalue()


def noise_png(seed: int, size: tuple[int, int] = (12, 12), mode: str = "L") -> bytes:
    """A distinct image per seed (different bytes, so never a duplicate)."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(buffer, "PNG")
    return buffer.getvalue()


@lru_cache(maxsize=1)
def digits() -> tuple[tuple[str, bytes], ...]:
    """scikit-learn's 1,797 real handwritten digits (8x8, values 0-16) as grayscale PNG files."""
    from sklearn.datasets import load_digits

    data = load_digits()
    out = []
    for array, target in zip(data.images, data.target, strict=True):
        buffer = io.BytesIO()
        Image.fromarray((array * 255 / 16).astype(np.uint8), "L").save(buffer, "PNG")
        out.append((str(int(target)), buffer.getvalue()))
    return tuple(out)


def zip_bytes(entries: Iterable[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """`image` saved in `fmt` (Pillow's save parameters pass through, e.g. exif=…)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)  # type: ignore[arg-type]
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but that holds no pixel data (a bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def zip_entries(
    entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]], *, compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    """Like `zip_bytes`, but an entry may be a ready ZipInfo (symlinks, odd attributes, stored data)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()
