"""Jobs as the API sees them: create, read, cancel, and the results a worker stored."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from app.core.errors import Conflict, Invalid, NotFound
from app.db.tables import (
    FINISHED_STATUSES,
    Checkpoint,
    CheckpointKind,
    EpochMetric,
    Evaluation,
    JobStatus,
    TrainingJob,
    WeightsFile,
    utcnow,
)
from app.schemas.jobs import (
    BestRead,
    ClassReport,
    EpochMetricRead,
    EvaluationRead,
    JobRead,
    JobSpec,
    MetricsRead,
)
from app.services.datasets import class_counts, get_dataset
from models.pretrained import PretrainedWeightsMissing, check_pretrained_available


def job_read(job: TrainingJob) -> JobRead:
    best = None
    if job.best_epoch is not None and job.best_metric is not None and job.best_value is not None:
        best = BestRead(epoch=job.best_epoch, metric=job.best_metric, value=job.best_value)
    return JobRead(
        id=job.id,
        status=job.status.value,
        dataset_id=job.dataset_id,
        spec=job.spec,
        progress=job.progress or {},
        best=best,
        classes=job.classes,
        split_sizes=job.split_sizes,
        info=job.info or {},
        stop_reason=job.stop_reason,
        error=job.error,
        attempts=job.attempts,
        worker_id=job.worker_id,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def create_job(
    session: Session, *, spec: JobSpec, idempotency_key: str | None = None
) -> tuple[TrainingJob, bool]:
    """Queue a job; returns (job, created). A repeated Idempotency-Key returns the first job; the same
    key with a different spec is a 422 (a retry that is not one)."""
    if idempotency_key:
        existing = session.scalar(select(TrainingJob).where(TrainingJob.idempotency_key == idempotency_key))
        if existing is not None:
            return _same_spec(existing, spec), False
    get_dataset(session, spec.dataset_id)
    _check_initialisation(session, spec)
    counts = class_counts(session, spec.dataset_id)
    if len(counts) < 2:
        raise Conflict(
            f"dataset {spec.dataset_id} has {len(counts)} class(es); training needs at least 2 "
            "classes with images"
        )
    job = TrainingJob(
        dataset_id=spec.dataset_id,
        spec=spec.model_dump(mode="json"),
        status=JobStatus.queued,
        idempotency_key=idempotency_key,
        nodes=spec.nodes,
        progress={"phase": "queued", "epoch": 0, "epochs": spec.epochs},
    )
    try:
        with session.begin_nested():  # a savepoint: a lost race must not doom the whole transaction
            session.add(job)
            session.flush()
    except IntegrityError:
        if not idempotency_key:
            raise
        # Another request with the same key committed first (PostgreSQL lets both get this far).
        existing = session.scalar(select(TrainingJob).where(TrainingJob.idempotency_key == idempotency_key))
        if existing is None:
            raise
        return _same_spec(existing, spec), False
    return job, True


def _same_spec(existing: TrainingJob, spec: JobSpec) -> TrainingJob:
    """The job an Idempotency-Key already made, when this request asks for the same job."""
    if existing.spec != spec.model_dump(mode="json"):
        raise Invalid(
            f"Idempotency-Key was already used for job {existing.id} with a different spec; "
            "a retry must send the same spec (use a new key for a new job)"
        )
    return existing


def _check_initialisation(session: Session, spec: JobSpec) -> None:
    """Refuse now, not in the worker, a job whose starting weights cannot be found."""
    if spec.init == "pretrained":
        try:
            check_pretrained_available(spec.model)
        except PretrainedWeightsMissing as exc:
            raise Invalid(f"init: {exc}") from None
    if spec.init_from_job is not None:
        source = session.get(TrainingJob, spec.init_from_job)
        if source is None:
            raise NotFound(f"init_from_job: job {spec.init_from_job} not found")
        if source.spec.get("model") != spec.model:
            raise Invalid(
                f"init_from_job: job {spec.init_from_job} trained {source.spec.get('model')}, "
                f"not {spec.model}; fine-tuning needs the same model"
            )
        best_checkpoint(session, spec.init_from_job, with_weights=False)  # 409 while it has none
    if spec.init_from_weights is not None:
        weights = session.get(WeightsFile, spec.init_from_weights)
        if weights is None:
            raise NotFound(f"init_from_weights: weights {spec.init_from_weights} not found")
        if weights.architecture is not None and weights.architecture != spec.model:
            raise Invalid(
                f"init_from_weights: weights {spec.init_from_weights} are for {weights.architecture}, "
                f"not {spec.model}"
            )


def get_job(session: Session, job_id: int) -> TrainingJob:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(session: Session, *, status: JobStatus | None = None, limit: int = 100) -> list[TrainingJob]:
    query = select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)
    if status is not None:
        query = query.where(TrainingJob.status == status)
    return list(session.scalars(query))


def cancel_job(session: Session, job_id: int) -> TrainingJob:
    """Cancel a queued job at once; ask the worker of a running job to stop after its batch."""
    job = get_job(session, job_id)
    if job.status in FINISHED_STATUSES:
        raise Conflict(f"job {job_id} is already {job.status.value}")
    if job.status == JobStatus.queued:
        job.status = JobStatus.cancelled
        job.stop_reason = "cancelled before it started"
        job.finished_at = utcnow()
    else:
        job.cancel_requested = True
    session.flush()
    return job


def job_metrics(session: Session, job_id: int) -> MetricsRead:
    job = get_job(session, job_id)
    rows = session.scalars(
        select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
    ).all()
    return MetricsRead(
        job_id=job.id,
        status=job.status.value,
        epochs=[EpochMetricRead.model_validate(row) for row in rows],
    )


def best_checkpoint(session: Session, job_id: int, *, with_weights: bool = True) -> Checkpoint:
    """The job's best checkpoint; 409 while the job has none yet."""
    job = get_job(session, job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == CheckpointKind.best)
    if with_weights:
        query = query.options(undefer(Checkpoint.weights))
    checkpoint = session.scalar(query)
    if checkpoint is None:
        raise Conflict(f"job {job_id} has no checkpoint yet (status: {job.status.value})")
    return checkpoint


def job_evaluation(session: Session, job_id: int) -> EvaluationRead:
    job = get_job(session, job_id)
    evaluation = session.get(Evaluation, job_id)
    if evaluation is None:
        raise Conflict(f"job {job_id} has no test evaluation yet (status: {job.status.value})")
    return EvaluationRead(
        job_id=job_id,
        split=evaluation.split,
        epoch=evaluation.epoch,
        num_samples=evaluation.num_samples,
        loss=evaluation.loss,
        accuracy=evaluation.accuracy,
        top5=evaluation.top5,
        macro_precision=evaluation.macro_precision,
        macro_recall=evaluation.macro_recall,
        macro_f1=evaluation.macro_f1,
        classes=job.classes or [],
        per_class=[ClassReport.model_validate(item) for item in evaluation.per_class],
        confusion_matrix=evaluation.confusion_matrix,
        created_at=evaluation.created_at,
    )
