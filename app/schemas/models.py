"""Model registry listing."""

from __future__ import annotations

from pydantic import BaseModel


class ModelRead(BaseModel):
    name: str
    default_image_size: int
    min_image_size: int
    mean: list[float]
    std: list[float]
    source: str
    description: str
