"""Predictions from a job's best checkpoint."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from app.api.deps import MAX_ID, SessionDep, SettingsDep
from app.core.errors import TooLarge
from app.schemas.predict import PredictionRead
from app.services.predictions import PredictorCache, predict_image

router = APIRouter(tags=["predict"])


@router.post("/predict", response_model=PredictionRead)
def predict(
    request: Request,
    job_id: Annotated[int, Form(ge=1, le=MAX_ID, description="The job whose best checkpoint answers.")],
    file: Annotated[UploadFile, File(description="One image, any size or mode.")],
    session: SessionDep,
    settings: SettingsDep,
) -> PredictionRead:
    """Softmax scores over every class of the job, with exactly the job's evaluation preprocessing."""
    data = file.file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise TooLarge(f"file is larger than the {settings.max_image_bytes}-byte image limit")
    cache: PredictorCache = request.app.state.predictors
    return predict_image(session, cache=cache, job_id=job_id, data=data, max_pixels=settings.max_image_pixels)
