"""Dataset requests and responses."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="A name for people (no control characters); ids are server-made.",
    )


class ClassCount(BaseModel):
    name: str
    count: int


class DatasetRead(BaseModel):
    id: int
    name: str
    num_images: int
    classes: list[ClassCount]
    splits: dict[str, int] = Field(
        description="Images per fixed split (`train`, `val`, `test`) and `unassigned` (split by the worker)."
    )
    created_at: datetime


class RejectedFile(BaseModel):
    filename: str
    reason: str


class UploadConflict(BaseModel):
    """Bytes that were already in the dataset (or earlier in the request) under another label or split:
    the stored image is kept as it was, and the upload is counted as a duplicate."""

    filename: str
    label: str
    split: str | None
    existing_filename: str
    existing_label: str
    existing_split: str | None


class UploadSummary(BaseModel):
    added: int
    duplicates: int
    rejected: list[RejectedFile]
    conflicts: list[UploadConflict] = Field(
        default_factory=list, description="Duplicates whose label or split disagrees with the stored copy."
    )
