"""The job spec (every training option, with its default and range) and job responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.registry import MODELS


class JobSpec(BaseModel):
    """What to train. Only `dataset_id` and `model` are required; every other option has a default."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: int = Field(description="The dataset to train on.")
    model: str = Field(description="Architecture name; `GET /models` lists them.")
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=4096)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10, description="Peak learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(default=1e-4, ge=0, le=1, description="Not applied to norms and biases.")
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = Field(default=10, ge=1, description="Epochs between decays (`step` scheduler).")
    gamma: float = Field(default=0.1, gt=0, le=1, description="Decay factor (`step` scheduler).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augmentation: Literal["none", "basic"] = Field(
        default="basic", description="`basic`: random scale, shift and small rotation per image."
    )
    horizontal_flip: bool = Field(default=False, description="Random horizontal flips (not for digits).")
    image_size: int | None = Field(default=None, ge=4, le=1024, description="Default: the model's own.")
    channels: Literal[1, 3] | None = Field(
        default=None, description="Default: 1 when every image is grayscale, else 3."
    )
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    monitor: Literal["val_acc", "val_loss", "val_f1"] = Field(
        default="val_acc", description="Validation metric that picks the best checkpoint."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many epochs without improvement (default: never)."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; choose one of: {', '.join(MODELS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave images for training (sum < 1)")
        info = MODELS[self.model]
        if self.image_size is not None and self.image_size < info.min_image_size:
            raise ValueError(
                f"image_size {self.image_size} is too small for {self.model} (at least {info.min_image_size})"
            )
        return self

    @property
    def monitor_mode(self) -> Literal["min", "max"]:
        return "min" if self.monitor == "val_loss" else "max"


class BestRead(BaseModel):
    epoch: int
    metric: str
    value: float


class JobRead(BaseModel):
    id: int
    status: str
    dataset_id: int
    spec: dict[str, Any]
    progress: dict[str, Any]
    best: BestRead | None
    classes: list[str] | None
    split_sizes: dict[str, int] | None
    stop_reason: str | None
    error: str | None
    attempts: int
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EpochMetricRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    val_top5: float | None
    val_precision: float | None
    val_recall: float | None
    val_f1: float | None
    lr: float
    seconds: float
    images_per_second: float
    data_seconds: float | None


class MetricsRead(BaseModel):
    job_id: int
    status: str
    epochs: list[EpochMetricRead]


class ClassReport(BaseModel):
    name: str
    precision: float
    recall: float
    f1: float
    support: int


class EvaluationRead(BaseModel):
    job_id: int
    split: str
    epoch: int
    num_samples: int
    loss: float | None
    accuracy: float | None
    top5: float | None
    macro_precision: float | None
    macro_recall: float | None
    macro_f1: float | None
    classes: list[str]
    per_class: list[ClassReport]
    confusion_matrix: list[list[int]] = Field(description="Rows: true class; columns: predicted class.")
    created_at: datetime
