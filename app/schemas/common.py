"""Shapes shared by several resources."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorRead(BaseModel):
    detail: str
