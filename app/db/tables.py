"""ORM tables. Image bytes, specs, metrics and weights all live here: the database is all workers share."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, deferred, mapped_column, relationship

from app.db.base import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class CheckpointKind(enum.StrEnum):
    best = "best"
    last = "last"


class Dataset(Base):
    __tablename__ = "dataset"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="dataset", cascade="all, delete-orphan")


class Image(Base):
    """One stored image; unique per dataset by content hash, so duplicates are never stored twice."""

    __tablename__ = "image"
    __table_args__ = (
        UniqueConstraint("dataset_id", "sha256"),
        Index("ix_image_dataset_id_label", "dataset_id", "label"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    # `train`, `val` or `test` when an archive fixed the split; NULL lets the worker split.
    split: Mapped[str | None] = mapped_column(String(8), default=None)
    filename: Mapped[str] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class TrainingJob(Base):
    __tablename__ = "training_job"
    __table_args__ = (Index("ix_training_job_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, validate_strings=True), default=JobStatus.queued
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, default=None)
    # Machines the job runs on: 1 is claimed by one worker; more by a gang of workers (`JobSlot`).
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    classes: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    split_sizes: Mapped[dict[str, int] | None] = mapped_column(JSON, default=None)
    # What the worker resolved from the spec and the data (input size, normalisation, device, init report).
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    best_epoch: Mapped[int | None] = mapped_column(Integer, default=None)
    best_metric: Mapped[str | None] = mapped_column(String(32), default=None)
    best_value: Mapped[float | None] = mapped_column(Float, default=None)
    stop_reason: Mapped[str | None] = mapped_column(String(200), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class JobSlot(Base):
    """One worker's place in the gang of a multi-node job (slot 0 .. nodes-1).

    While the job is queued the rows gather (attempt NULL, refreshed by their holders); the holder of
    slot 0 starts the job once every slot is held and stamps each row with the attempt and the
    rendezvous endpoint it publishes, which the other holders then join.
    """

    __tablename__ = "job_slot"
    __table_args__ = (UniqueConstraint("job_id", "worker_id"),)

    job_id: Mapped[int] = mapped_column(
        ForeignKey("training_job.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    worker_id: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int | None] = mapped_column(Integer, default=None)
    endpoint: Mapped[str | None] = mapped_column(String(300), default=None)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class EpochMetric(Base):
    """One row per finished epoch; the unique key makes a repeated write fail instead of duplicating."""

    __tablename__ = "epoch_metric"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_job.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    train_acc: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_acc: Mapped[float | None] = mapped_column(Float)
    val_top5: Mapped[float | None] = mapped_column(Float, default=None)
    val_precision: Mapped[float | None] = mapped_column(Float, default=None)
    val_recall: Mapped[float | None] = mapped_column(Float, default=None)
    val_f1: Mapped[float | None] = mapped_column(Float, default=None)
    lr: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    images_per_second: Mapped[float] = mapped_column(Float)
    data_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Checkpoint(Base):
    """Weights as safetensors bytes plus the metadata needed to rebuild model and preprocessing."""

    __tablename__ = "checkpoint"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_job.id", ondelete="CASCADE"))
    kind: Mapped[CheckpointKind] = mapped_column(Enum(CheckpointKind, native_enum=False, length=8))
    epoch: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str | None] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    weights: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Evaluation(Base):
    """Test-split metrics of the best weights, stored once when the job ends."""

    __tablename__ = "evaluation"

    job_id: Mapped[int] = mapped_column(ForeignKey("training_job.id", ondelete="CASCADE"), primary_key=True)
    split: Mapped[str] = mapped_column(String(8))
    epoch: Mapped[int] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    top5: Mapped[float | None] = mapped_column(Float)
    macro_precision: Mapped[float | None] = mapped_column(Float)
    macro_recall: Mapped[float | None] = mapped_column(Float)
    macro_f1: Mapped[float | None] = mapped_column(Float)
    per_class: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    confusion_matrix: Mapped[list[list[int]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobLog(Base):
    """A worker's log line for one job, written in batches; `id` orders the lines and resumes streams."""

    __tablename__ = "job_log"
    __table_args__ = (Index("ix_job_log_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_job.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(10))
    logger: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WeightsFile(Base):
    """Starting weights a client uploaded (`POST /weights`), stored as safetensors whatever the upload
    was, addressed only by the server's id; `filename` is the client's name, kept for display only."""

    __tablename__ = "weights_file"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filename: Mapped[str] = mapped_column(String(500))
    source_format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_tensors: Mapped[int] = mapped_column(Integer)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    architecture: Mapped[str | None] = mapped_column(String(64), default=None)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerCapacity(Base):
    """What one worker process can serve, so the API can refuse at submit a job no worker could ever
    run. A worker writes its row when it starts and refreshes `heartbeat_at` while it runs; rows whose
    heartbeat is older than the lease timeout are not counted. `max_devices`: processes per node it
    can run for one job (its GPUs, or its CPU setting); `accelerator`: `cpu` or `cuda`."""

    __tablename__ = "worker_capacity"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    accelerator: Mapped[str] = mapped_column(String(16))
    max_devices: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
