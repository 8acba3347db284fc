"""Training jobs: submit, follow, cancel, and download what they produced."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.api.deps import SessionDep
from app.db.tables import JobStatus
from app.schemas.jobs import EvaluationRead, JobRead, JobSpec, MetricsRead
from app.services import jobs as service

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", response_model=JobRead, status_code=status.HTTP_201_CREATED)
def create_job(
    spec: JobSpec,
    session: SessionDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Retrying with the same key returns the first job (200)."),
    ] = None,
) -> JobRead:
    """Queue a training job; a worker picks it up. Only `dataset_id` and `model` are required."""
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
def get_job(job_id: int, session: SessionDep) -> JobRead:
    """A job's status, progress and best epoch so far."""
    return service.job_read(service.get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: int, session: SessionDep) -> JobRead:
    """Cancel a queued job now; a running job stops after its current batch, keeping its best checkpoint."""
    return service.job_read(service.cancel_job(session, job_id))


@router.get("/{job_id}/metrics", response_model=MetricsRead)
def get_metrics(job_id: int, session: SessionDep) -> MetricsRead:
    """One row per finished epoch (also while the job runs)."""
    return service.job_metrics(session, job_id)


@router.get("/{job_id}/evaluation", response_model=EvaluationRead)
def get_evaluation(job_id: int, session: SessionDep) -> EvaluationRead:
    """Test-split metrics of the best weights: accuracy, per-class report, confusion matrix."""
    return service.job_evaluation(session, job_id)


@router.get(
    "/{job_id}/checkpoint",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
def download_checkpoint(job_id: int, session: SessionDep) -> Response:
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
