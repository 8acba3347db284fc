"""The one place images become tensors. Training, validation, testing and /predict all go through
`decode_image` → `to_uint8` → `normalize`, configured by a `Preprocessing` stored in every checkpoint,
so serving can never drift from what the model was evaluated with."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message says why, for the client."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn any image into the model's input."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_meta(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(meta["image_size"]),
            channels=int(meta["channels"]),
            mean=tuple(float(v) for v in meta["mean"]),
            std=tuple(float(v) for v in meta["std"]),
        )

    @classmethod
    def for_channels(
        cls, *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> Preprocessing:
        """A preset given for RGB, folded to one channel for grayscale data."""
        if channels == 1 and len(mean) == 3:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        return cls(image_size=image_size, channels=channels, mean=tuple(mean), std=tuple(std))


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode and upright an image; raise ImageDecodeError with a readable reason.

    `max_pixels` is checked from the header, before any pixel is decoded, and per call: Pillow's own
    process-wide `Image.MAX_IMAGE_PIXELS` stays as a last guard and is never changed here.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageDecodeError(
                f"image too large: {image.width}x{image.height} pixels is over the limit of {max_pixels}"
            )
        image.load()  # decodes every byte: catches truncated files that open() alone accepts
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
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError("image has no pixels")
    ImageOps.exif_transpose(image, in_place=True)  # in place keeps `.format`, which a copy would lose
    return image


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, as they look in a viewer, instead of arbitrary colours."""
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
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


def to_uint8(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """Any image → uint8 tensor (channels, size, size): the form the decoded-image cache holds."""
    image = _to_8bit(_flatten_alpha(image))
    image = image.convert("L" if preprocessing.channels == 1 else "RGB")
    tensor = F.pil_to_tensor(image)
    size = [preprocessing.image_size, preprocessing.image_size]
    if list(tensor.shape[-2:]) != size:
        tensor = F.resize(tensor, size, antialias=True)
    return tensor


def normalize(batch: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 (…, C, H, W) → float32 normalised with the preprocessing's mean and std."""
    mean = torch.tensor(preprocessing.mean, device=batch.device).view(-1, 1, 1)
    std = torch.tensor(preprocessing.std, device=batch.device).view(-1, 1, 1)
    return (batch.float().div_(255.0) - mean) / std


def eval_input(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """One image → the normalised (1, C, H, W) tensor the model was validated and tested on."""
    return normalize(to_uint8(image, preprocessing), preprocessing).unsqueeze(0)
