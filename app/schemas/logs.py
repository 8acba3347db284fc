"""Job log responses."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class JobLogLine(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    attempt: int
    level: str
    logger: str
    message: str
    created_at: datetime


class JobLogsRead(BaseModel):
    job_id: int
    status: str
    lines: list[JobLogLine]
