"""Uploaded starting weights."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class WeightsRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="Server-made id; a job spec names it as `init_from_weights`.")
    filename: str = Field(description="The uploaded file's name, for people only; nothing is stored by it.")
    source_format: str = Field(description="`safetensors`, or `pytorch` (converted to safetensors).")
    sha256: str = Field(description="SHA-256 of the bytes as uploaded.")
    size_bytes: int = Field(description="Size as uploaded.")
    num_tensors: int
    num_parameters: int
    architecture: str | None = Field(description="From trainserve metadata, when the file carries it.")
    meta: dict[str, Any]
    created_at: datetime
