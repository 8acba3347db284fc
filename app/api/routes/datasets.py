"""Datasets and their images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from app.api.deps import IdPath, SessionDep, SettingsDep
from app.api.uploads import UploadRoute
from app.core.errors import Invalid, TooLarge
from app.schemas.datasets import DatasetCreate, DatasetRead, UploadSummary
from app.services import datasets as service

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=UploadRoute)


@router.post("", response_model=DatasetRead, status_code=status.HTTP_201_CREATED)
def create_dataset(body: DatasetCreate, session: SessionDep) -> DatasetRead:
    """Create an empty dataset."""
    return service.create_dataset(session, dataset_create=body)


@router.get("", response_model=list[DatasetRead])
def list_datasets(session: SessionDep) -> list[DatasetRead]:
    """Every dataset with its class counts."""
    return service.list_datasets(session)


@router.get("/{dataset_id}", response_model=DatasetRead)
def get_dataset(dataset_id: IdPath, session: SessionDep) -> DatasetRead:
    """One dataset with its class counts."""
    return service.dataset_read(session, service.get_dataset(session, dataset_id))


def _read_bounded(upload: UploadFile, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than `limit` (reading stops at limit + 1)."""
    data = upload.file.read(limit + 1)
    return None if len(data) > limit else data


@router.post("/{dataset_id}/images", response_model=UploadSummary, status_code=status.HTTP_201_CREATED)
def upload_images(
    dataset_id: IdPath,
    label: Annotated[str, Form(description="Class name of every file in this request.")],
    files: Annotated[list[UploadFile], File(description="One or more images (PNG, JPEG, BMP, WebP...).")],
    session: SessionDep,
    settings: SettingsDep,
) -> UploadSummary:
    """Add images of one class. A bad file is rejected by name; the good ones are still added."""
    if len(files) > settings.max_files_per_request:
        raise TooLarge(f"{len(files)} files in one request; the limit is {settings.max_files_per_request}")
    result = service.add_labelled_files(
        session,
        dataset_id=dataset_id,
        label=label,
        files=[(f.filename or "unnamed", _read_bounded(f, settings.max_image_bytes)) for f in files],
        settings=settings,
    )
    return UploadSummary.model_validate(result, from_attributes=True)


@router.post("/{dataset_id}/archive", response_model=UploadSummary, status_code=status.HTTP_201_CREATED)
def upload_archive(
    dataset_id: IdPath,
    file: Annotated[
        UploadFile, File(description="A zip of <class>/<image> (optionally under train/ val/ test/).")
    ],
    session: SessionDep,
    settings: SettingsDep,
) -> UploadSummary:
    """Add a zip in the ImageFolder layout; `train/ val/ test/` folders fix each image's split."""
    file.file.seek(0, 2)
    size = file.file.tell()
    file.file.seek(0)
    if size > settings.max_archive_bytes:
        raise TooLarge(f"archive is {size} bytes; the limit is {settings.max_archive_bytes}")
    if size == 0:
        raise Invalid("file is empty, not a zip archive")
    result = service.add_archive(session, dataset_id=dataset_id, fileobj=file.file, settings=settings)
    return UploadSummary.model_validate(result, from_attributes=True)
