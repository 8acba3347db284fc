"""The architectures a job can name."""

from __future__ import annotations

from fastapi import APIRouter

from app.schemas.models import ModelRead
from models.registry import MODELS

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=list[ModelRead])
def list_models() -> list[ModelRead]:
    """Every registered architecture with its default input size and normalisation."""
    return [
        ModelRead(
            name=info.name,
            default_image_size=info.default_image_size,
            min_image_size=info.min_image_size,
            mean=list(info.mean),
            std=list(info.std),
            source=info.source,
            description=info.description,
            pretrained_weights=info.weights,
        )
        for info in MODELS.values()
    ]
