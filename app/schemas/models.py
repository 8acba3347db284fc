"""Model registry listing."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelRead(BaseModel):
    name: str
    default_image_size: int
    min_image_size: int
    mean: list[float]
    std: list[float]
    source: str
    description: str
    pretrained_weights: str | None = Field(
        description="torchvision weights used by `init: pretrained` (read from the local torch cache)."
    )
