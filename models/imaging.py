"""Image bytes → upright, 8-bit pixels with Pillow and NumPy only (no torch).

`models.preprocessing` builds its tensors on these functions, and the worker's cache builder runs
them in child processes that start in a fraction of a second because they never import torch.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")

# EXIF orientation → the transposition that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message says why, for the client."""


@contextmanager
def _decoding(max_pixels: int | None) -> Iterator[None]:
    """Pillow's many failures as ImageDecodeError with a readable reason."""
    try:
        yield
    except Image.DecompressionBombError as exc:  # Pillow's guard fires in open() for the worst bombs
        limit = f"the limit of {max_pixels}" if max_pixels is not None else "Pillow's limit"
        raise ImageDecodeError(f"image too large: over {limit} pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a supported image (accepted formats: {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image's header, checked against `max_pixels` before any pixel is decoded (inside `_decoding`)."""
    if not data:
        raise ImageDecodeError("empty file")
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {image.width}x{image.height} pixels is over the limit of {max_pixels}"
        )
    return image


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode and upright an image; raise ImageDecodeError with a readable reason.

    `max_pixels` is checked from the header, before any pixel is decoded, and per call: Pillow's own
    process-wide `Image.MAX_IMAGE_PIXELS` stays as a last guard and is never changed here.
    """
    with _decoding(max_pixels):
        image = _open(data, max_pixels)
        image.load()  # decodes every byte: catches truncated files that open() alone accepts
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError("image has no pixels")
    return _upright(image)


def decode_reduced(data: bytes, *, box: int, max_pixels: int | None = None) -> Image.Image:
    """The image upright and shrunk to fit `box` x `box` (never enlarged), decoded as small as the
    format allows: a JPEG at 1/2, 1/4 or 1/8 scale straight from the file (draft mode), and every
    large image reduced by whole factors before the final resampling, so a 9400x9400 JPEG thumbnail
    never holds the full image in memory."""
    with _decoding(max_pixels):
        image = _open(data, max_pixels)
        image.thumbnail((box, box), Image.Resampling.LANCZOS, reducing_gap=2.0)  # draft, load, reduce
        image.load()  # an image that already fits is not loaded by thumbnail(): decode it here
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError("image has no pixels")
    return _upright(image)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), or 1 when the image has none or its EXIF block cannot be read.

    EXIF is untrusted metadata that Pillow parses lazily, and a malformed block raises almost anything
    (SyntaxError for a bad TIFF header, struct.error, ValueError for a negative offset, AttributeError,
    TypeError...). A bad block is ignored: the image is kept as stored, never the request failed.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # see above: any failure to parse hostile metadata means "no orientation"
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Only the pixels are turned: the EXIF block is
    not rewritten (Pillow's exif_transpose re-serialises it, which fails on malformed blocks), and the
    stored file keeps its original bytes anyway."""
    method = _UPRIGHT.get(exif_orientation(image))
    if method is None:
        return image
    turned = image.transpose(method)
    turned.format = image.format  # a transposed copy has no format; callers record it
    return turned


def flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, as they look in a viewer, instead of arbitrary colours."""
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled to 8 bits (Pillow's convert('L') would clip them)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit samples (Pillow opens 16-bit PNGs as I;16 or I): the same scale for every image,
        # never one guessed from its content.
        array = np.asarray(image, dtype=np.int64)
        return Image.fromarray(np.clip(array >> 8, 0, 255).astype(np.uint8))
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(array * 255.0, 0, 255).astype(np.uint8))  # floats are [0, 1]
    return image


def to_pixels(image: Image.Image, channels: int) -> np.ndarray:
    """Any decoded image → uint8 array (channels, height, width) at its own size."""
    image = to_8bit(flatten_alpha(image)).convert("L" if channels == 1 else "RGB")
    array = np.asarray(image)
    return array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)
