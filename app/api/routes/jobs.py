"""Training jobs: submit, follow, cancel, and download what they produced."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response, status

from app.api.deps import IdPath, SessionDep, SettingsDep
from app.db.tables import JobStatus
from app.schemas.jobs import EvaluationRead, JobRead, JobSpec, MetricsRead
from app.services import capacity, charts
from app.services import jobs as service

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", response_model=JobRead, status_code=status.HTTP_201_CREATED)
def create_job(
    spec: JobSpec,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Retrying with the same key returns the first job (200)."),
    ] = None,
) -> JobRead:
    """Queue a training job; a worker picks it up. Only `dataset_id` and `model` are required.
    A `devices` x `nodes` that no worker could ever serve is a 422 (it would wait for ever)."""
    capacity.check_job_fits(session, spec=spec, settings=settings)
    job, created = service.create_job(session, spec=spec, idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return service.job_read(job)


@router.get("", response_model=list[JobRead])
def list_jobs(
    session: SessionDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobRead]:
    """Jobs, newest first."""
    return [service.job_read(job) for job in service.list_jobs(session, status=status_filter, limit=limit)]


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: IdPath, session: SessionDep) -> JobRead:
    """A job's status, progress and best epoch so far."""
    return service.job_read(service.get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: IdPath, session: SessionDep) -> JobRead:
    """Cancel a queued job now; a running job stops after its current batch, keeping its best checkpoint."""
    return service.job_read(service.cancel_job(session, job_id))


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsRead,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with `format=csv`"}},
)
def get_metrics(
    job_id: IdPath,
    session: SessionDep,
    format: Annotated[
        Literal["json", "csv"],
        Query(description="`csv`: one line per epoch, every metric a column (a file download)."),
    ] = "json",
) -> MetricsRead | Response:
    """One row per finished epoch (also while the job runs), as JSON or CSV."""
    metrics = service.job_metrics(session, job_id)
    if format == "csv":
        return Response(
            content=charts.metrics_csv(metrics.epochs),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="job-{job_id}-metrics.csv"'},
        )
    return metrics


@router.get(
    "/{job_id}/metrics.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
)
def get_metrics_chart(job_id: IdPath, session: SessionDep) -> Response:
    """Loss, accuracy and learning-rate curves per epoch as a PNG (also while the job runs)."""
    job = service.get_job(session, job_id)
    metrics = service.job_metrics(session, job_id)
    title = f"job {job_id}: {job.spec.get('model', '?')} ({metrics.status})"
    png = charts.metrics_png(metrics.epochs, title=title, best_epoch=job.best_epoch)
    return Response(content=png, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/evaluation", response_model=EvaluationRead)
def get_evaluation(job_id: IdPath, session: SessionDep) -> EvaluationRead:
    """Test-split metrics of the best weights: accuracy, per-class report, confusion matrix."""
    return service.job_evaluation(session, job_id)


@router.get(
    "/{job_id}/confusion.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
)
def get_confusion_chart(job_id: IdPath, session: SessionDep) -> Response:
    """The test evaluation's confusion matrix as a PNG heat map (409 until the evaluation exists)."""
    evaluation = service.job_evaluation(session, job_id)
    accuracy = "" if evaluation.accuracy is None else f", accuracy {evaluation.accuracy:.1%}"
    title = (
        f"job {job_id}: {evaluation.split} split, epoch {evaluation.epoch}, "
        f"{evaluation.num_samples} images{accuracy}"
    )
    png = charts.confusion_png(evaluation.classes, evaluation.confusion_matrix, title=title)
    return Response(content=png, media_type="image/png")


@router.get(
    "/{job_id}/checkpoint",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
def download_checkpoint(job_id: IdPath, session: SessionDep) -> Response:
    """The best weights as a safetensors file; its header metadata holds classes and preprocessing."""
    checkpoint = service.best_checkpoint(session, job_id)
    return Response(
        content=checkpoint.weights,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": (
                f'attachment; filename="job-{job_id}-epoch-{checkpoint.epoch}.safetensors"'
            ),
            "X-Checkpoint-Epoch": str(checkpoint.epoch),
        },
    )
