"""Prediction responses."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PredictionRead(BaseModel):
    job_id: int
    epoch: int = Field(description="Epoch of the checkpoint that answered.")
    label: str
    score: float
    scores: dict[str, float] = Field(description="Softmax over every class of the job; sums to 1.")
