"""The one place images become tensors. Training, validation, testing and /predict all go through
`decode_image` → `to_uint8` → `normalize`, configured by a `Preprocessing` stored in every checkpoint,
so serving can never drift from what the model was evaluated with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

# Re-exported: decoding itself is torch-free, in `models.imaging`.
from models.imaging import ALLOWED_FORMATS, GRAYSCALE_MODES, ImageDecodeError, decode_image, to_pixels

__all__ = [
    "ALLOWED_FORMATS",
    "GRAYSCALE_MODES",
    "ImageDecodeError",
    "Preprocessing",
    "decode_image",
    "eval_input",
    "normalize",
    "to_uint8",
]


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


def to_uint8(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """Any image → uint8 tensor (channels, size, size): the form the decoded-image cache holds."""
    tensor = torch.from_numpy(to_pixels(image, preprocessing.channels).copy())
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
