"""Predictions from a job's best checkpoint, batched across concurrent requests.

The forms are parsed by the same bounded multipart parser as uploads (`UploadRoute`): a file stops
being stored one byte past `max_image_bytes` and the file count is checked as each part begins, so an
oversize or many-file request costs no more than its limits (Starlette's parser spooled whole files
and parsed up to 1,000 parts before the route could count them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from app.api.deps import MAX_ID, SettingsDep
from app.api.uploads import UploadRoute
from app.core.config import Settings
from app.core.errors import DomainError, TooLarge
from app.schemas.predict import BatchItemRead, BatchPredictionRead, PredictionRead
from app.services.predictions import ModelCache, predict_many, predict_one

router = APIRouter(tags=["predict"], route_class=UploadRoute)

JobIdForm = Annotated[int, Form(ge=1, le=MAX_ID, description="The job whose best checkpoint answers.")]
TopKForm = Annotated[
    int | None,
    Form(ge=1, le=10_000, description="Also list the k most likely classes (at most the class count)."),
]


def _cache(request: Request) -> ModelCache:
    cache: ModelCache = request.app.state.predictors
    return cache


async def _read_image(file: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes, refused past the image size limit (read bounded: never the whole body)."""
    data = await file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise TooLarge(f"file is larger than the {settings.max_image_bytes}-byte image limit")
    return data


@router.post("/predict", response_model=PredictionRead, response_model_exclude_none=True)
async def predict(
    request: Request,
    job_id: JobIdForm,
    file: Annotated[UploadFile, File(description="One image, any size or mode.")],
    settings: SettingsDep,
    top_k: TopKForm = None,
) -> PredictionRead:
    """Softmax scores over every class of the job, with exactly the job's evaluation preprocessing."""
    data = await _read_image(file, settings)
    return await predict_one(_cache(request), job_id=job_id, data=data, top_k=top_k)


@router.post("/predict/batch", response_model=BatchPredictionRead, response_model_exclude_none=True)
async def predict_batch(
    request: Request,
    job_id: JobIdForm,
    files: Annotated[list[UploadFile], File(description="Several images; one result each, in order.")],
    settings: SettingsDep,
    top_k: TopKForm = None,
) -> BatchPredictionRead:
    """One prediction per file, in order; a bad file gets its own error and the others still answer.
    More than `TRAINSERVE_PREDICT_MAX_FILES` files is a 413 while the form is parsed."""
    datas: list[bytes | DomainError] = []
    for file in files:
        try:
            datas.append(await _read_image(file, settings))
        except DomainError as exc:
            datas.append(exc)
    model, results = await predict_many(_cache(request), job_id=job_id, files=datas, top_k=top_k)
    items = [
        BatchItemRead(index=i, filename=f.filename, prediction=r, status_code=200)
        if not isinstance(r, DomainError)
        else BatchItemRead(index=i, filename=f.filename, error=r.message, status_code=r.status_code)
        for i, (f, r) in enumerate(zip(files, results, strict=True))
    ]
    return BatchPredictionRead(job_id=job_id, epoch=model.epoch, results=items)
