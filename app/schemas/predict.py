"""Prediction responses."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LabelScore(BaseModel):
    label: str
    score: float


class PredictionRead(BaseModel):
    job_id: int
    epoch: int = Field(description="Epoch of the best checkpoint that answered: (job_id, epoch) names it.")
    label: str
    score: float
    scores: dict[str, float] = Field(description="Softmax over every class of the job; sums to 1.")
    top: list[LabelScore] | None = Field(
        default=None, description="The `top_k` most likely classes, best first (only when `top_k` is sent)."
    )


class BatchItemRead(BaseModel):
    index: int = Field(description="Position of the file in the request.")
    filename: str | None
    prediction: PredictionRead | None = None
    error: str | None = Field(default=None, description="Why this file got no prediction.")
    status_code: int = Field(description="The HTTP status this file alone would have had.")


class BatchPredictionRead(BaseModel):
    job_id: int
    epoch: int = Field(description="Epoch of the checkpoint that answered every file.")
    results: list[BatchItemRead] = Field(description="One entry per file, in the order sent.")
