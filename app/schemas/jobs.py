"""The job spec (every training option, with its default and range) and job responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from models.registry import MODELS


def _earlier(info: ValidationInfo, name: str) -> Any:
    """A field validated before this one (absent when that field itself was invalid)."""
    return info.data.get(name)


MAX_DEVICES = 64


class JobSpec(BaseModel):
    """What to train. Only `dataset_id` and `model` are required; every other option has a default."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: int = Field(ge=1, le=2**31 - 1, description="The dataset to train on.")
    model: str = Field(description="Architecture name; `GET /models` lists them.")

    # Initialisation.
    init: Literal["random", "pretrained"] = Field(
        default="random",
        description="`pretrained`: torchvision ImageNet weights from the local torch cache (TORCH_HOME); "
        "never downloaded at run time.",
    )
    init_from_job: int | None = Field(
        default=None,
        ge=1,
        le=2**31 - 1,
        description="Fine-tune from this earlier job's best checkpoint (same model); the classifier head "
        "is replaced when the class count differs.",
    )
    init_from_weights: int | None = Field(
        default=None,
        ge=1,
        le=2**31 - 1,
        description="Start from weights uploaded with `POST /weights` (this id): every tensor whose name "
        "and shape fit the model is loaded, the rest (a head for another class count) keeps its init.",
    )

    # Input.
    image_size: int | None = Field(default=None, ge=4, le=1024, description="Default: the model's own.")
    channels: Literal[1, 3] | None = Field(
        default=None, description="Default: 1 when every image is grayscale, else 3."
    )
    normalization: Literal["preset", "dataset"] = Field(
        default="preset",
        description="`preset`: the model's mean/std (ImageNet for torchvision models); `dataset`: mean/std "
        "computed from the training split.",
    )

    # Augmentation.
    augmentation: Literal["none", "basic", "strong"] = Field(
        default="basic",
        description="`basic`: per-image random resized crop (scale, shift, ±10° rotation); `strong`: basic "
        "plus TrivialAugmentWide and random erasing.",
    )
    horizontal_flip: bool = Field(default=False, description="Random horizontal flips (not for digits).")
    mixup_alpha: float = Field(default=0.0, ge=0, le=10, description="MixUp when > 0.")
    cutmix_alpha: float = Field(default=0.0, ge=0, le=10, description="CutMix when > 0.")

    # Optimisation.
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=4096)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10, description="Peak learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD and RMSprop momentum.")
    nesterov: bool = Field(default=False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(default=1e-4, ge=0, le=1, description="Not applied to norms and biases.")
    scheduler: Literal["none", "step", "multistep", "cosine", "cosine_restarts", "plateau", "onecycle"] = (
        "cosine"
    )
    step_size: int = Field(default=10, ge=1, le=100_000, description="Epochs between decays (`step`).")
    milestones: list[int] = Field(
        default=[30, 60], min_length=1, max_length=100, description="Epochs at which to decay (`multistep`)."
    )
    gamma: float = Field(
        default=0.1, gt=0, lt=1, description="Decay factor (`step`, `multistep`, `plateau`)."
    )
    restart_epochs: int = Field(
        default=10, ge=1, le=100_000, description="Epochs of the first cycle (`cosine_restarts`)."
    )
    restart_mult: int = Field(default=1, ge=1, le=10, description="Cycle growth (`cosine_restarts`).")
    plateau_patience: int = Field(default=2, ge=0, le=100, description="Epochs without progress (`plateau`).")
    warmup_epochs: int = Field(
        default=0, ge=0, le=1000, description="Linear warm-up to `lr` over these epochs."
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = Field(
        default="none",
        description="`balanced`: loss weights inversely proportional to training class counts.",
    )
    grad_clip_norm: float | None = Field(
        default=None, gt=0, le=1e6, description="Clip the gradient norm to this."
    )
    accumulate_steps: int = Field(default=1, ge=1, le=1024, description="Batches per optimiser step.")
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = Field(
        default="auto",
        description="`auto`: bf16 (or fp16 with a grad scaler) autocast on CUDA; on the CPU bf16 only "
        "where the CPU has bf16 instructions and a timed trial of a few steps shows it faster; `bf16` "
        "also on the CPU; `fp16` needs CUDA.",
    )
    freeze_epochs: int = Field(
        default=0, ge=0, le=1000, description="Train only the classifier head for the first N epochs."
    )
    compile: bool = Field(
        default=False,
        description="Train the model through `torch.compile` (the first batches wait for the compiler; "
        "validation and checkpoints use the plain model).",
    )
    ema_decay: float | None = Field(
        default=None, ge=0.5, lt=1, description="Keep an EMA of the weights; it is validated and saved."
    )

    # Validation, early stopping, reproducibility.
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    monitor: Literal["val_acc", "val_loss", "val_f1"] = Field(
        default="val_acc", description="Validation metric that picks the best checkpoint and stops early."
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Stop after this many epochs without improvement (default: never).",
    )
    min_delta: float = Field(
        default=0.0, ge=0, le=1e6, description="Smallest change that counts as improvement."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    # Data-parallel training (torch.distributed: DDP over gloo on the CPU, nccl on CUDA).
    devices: int | Literal["auto"] = Field(
        default=1,
        description="Processes per node: an integer, or `auto` for every GPU the worker sees (1 on a CPU "
        "worker). More than one on a CPU worker runs that many gloo processes.",
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Workers (machines) the job runs on; more than 1 waits until that many workers hold "
        "one of its slots (gang scheduling).",
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        default="none",
        description="How `lr` follows the world size (batch_size is per process, so the effective batch is "
        "batch_size x accumulate_steps x processes): `none` keeps `lr`; `linear` multiplies it by the number "
        "of processes (Goyal et al.); `sqrt` by its square root.",
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; choose one of: {', '.join(MODELS)}")
        return value

    @field_validator("init")
    @classmethod
    def _pretrained_exists(cls, value: str, info: ValidationInfo) -> str:
        model = _earlier(info, "model")
        if value == "pretrained" and model in MODELS and MODELS[model].weights is None:
            with_weights = [name for name, m in MODELS.items() if m.weights]
            raise ValueError(f"{model} has no pretrained weights; models that do: {', '.join(with_weights)}")
        return value

    @field_validator("init_from_job")
    @classmethod
    def _one_init(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and _earlier(info, "init") == "pretrained":
            raise ValueError("init_from_job and init='pretrained' exclude each other")
        return value

    @field_validator("init_from_weights")
    @classmethod
    def _one_source(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and (_earlier(info, "init") == "pretrained" or _earlier(info, "init_from_job")):
            raise ValueError("init_from_weights excludes init='pretrained' and init_from_job")
        return value

    @field_validator("image_size")
    @classmethod
    def _large_enough(cls, value: int | None, info: ValidationInfo) -> int | None:
        model = _earlier(info, "model")
        if value is not None and model in MODELS and value < MODELS[model].min_image_size:
            raise ValueError(
                f"image_size {value} is too small for {model} (at least {MODELS[model].min_image_size})"
            )
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        # One clear message instead of one error per member of the union.
        if value == "auto" or (type(value) is int and 1 <= value <= MAX_DEVICES):
            return value
        raise ValueError(f"devices must be an integer from 1 to {MAX_DEVICES}, or 'auto'")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(m < 1 or m > 100_000 for m in value) or value != sorted(set(value)):
            raise ValueError("milestones must be strictly increasing epoch numbers from 1 to 100000")
        return value

    @field_validator("warmup_epochs", "freeze_epochs")
    @classmethod
    def _shorter_than_training(cls, value: int, info: ValidationInfo) -> int:
        epochs = _earlier(info, "epochs")
        if epochs is not None and value >= epochs and value > 0:
            raise ValueError(f"{info.field_name} ({value}) must be smaller than epochs ({epochs})")
        return value

    @field_validator("test_fraction")
    @classmethod
    def _leaves_training_images(cls, value: float, info: ValidationInfo) -> float:
        val_fraction = _earlier(info, "val_fraction")
        if val_fraction is not None and val_fraction + value >= 1:
            raise ValueError("val_fraction + test_fraction must leave images for training (sum < 1)")
        return value

    @model_validator(mode="after")
    def _scheduler_options(self) -> JobSpec:
        if self.scheduler == "onecycle" and self.warmup_epochs:
            raise ValueError("warmup_epochs: onecycle has its own warm-up; leave warmup_epochs at 0")
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
    info: dict[str, Any] = Field(
        description="What the worker resolved: input size, channels, normalisation, device, precision, "
        "initialisation report (loaded/skipped keys)."
    )
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
