"""Stored images as the dataset browser sees them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class ImageRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    label: str
    split: str | None
    filename: str
    format: str
    width: int
    height: int
    size_bytes: int
    created_at: datetime
