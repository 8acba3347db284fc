"""Shapes shared by several resources."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorRead(BaseModel):
    """Every error: a message (or, for a malformed request, FastAPI's list of field errors), plus
    details some errors add (an upload with nothing usable lists its `rejected` files)."""

    model_config = ConfigDict(extra="allow")

    detail: str | list[dict[str, Any]] = Field(description="What is wrong, for the client.")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, so clients and schema checks know them."""
    return {status: {"model": ErrorRead, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


ERROR_DESCRIPTIONS = {
    400: "Malformed request (a body that cannot be parsed)",
    401: "Missing or invalid API key",
    404: "No such resource",
    409: "Conflicts with the resource's state",
    413: "Body, file or archive over its size limit (the message names the limit)",
    422: "Invalid request or content (the message names the field or file)",
}
