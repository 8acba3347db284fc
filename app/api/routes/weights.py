"""Starting weights: upload a safetensors or PyTorch state dict, then name it in a job spec."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status

from app.api.deps import IdPath, SessionDep, SettingsDep
from app.api.uploads import UploadRoute
from app.core.errors import TooLarge
from app.schemas.weights import WeightsRead
from app.services import weights as service

router = APIRouter(prefix="/weights", tags=["weights"], route_class=UploadRoute)


@router.post("", response_model=WeightsRead, status_code=status.HTTP_201_CREATED)
def upload_weights(
    file: Annotated[
        UploadFile,
        File(description="A safetensors file, or a PyTorch state dict (.pt/.pth, read with weights_only)."),
    ],
    session: SessionDep,
    settings: SettingsDep,
) -> WeightsRead:
    """Store starting weights; `init_from_weights: <id>` in a job spec loads every tensor that fits."""
    data = file.file.read(settings.max_weights_bytes + 1)
    if len(data) > settings.max_weights_bytes:
        raise TooLarge(f"file is larger than the {settings.max_weights_bytes}-byte weights limit")
    row = service.create_weights(session, filename=file.filename or "unnamed", data=data, settings=settings)
    return WeightsRead.model_validate(row)


@router.get("", response_model=list[WeightsRead])
def list_weights(session: SessionDep) -> list[WeightsRead]:
    """Every uploaded weight file (metadata only)."""
    return [WeightsRead.model_validate(row) for row in service.list_weights(session)]


@router.get("/{weights_id}", response_model=WeightsRead)
def get_weights(weights_id: IdPath, session: SessionDep) -> WeightsRead:
    """One uploaded weight file's metadata."""
    return WeightsRead.model_validate(service.get_weights(session, weights_id))
