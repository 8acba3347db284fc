"""Datasets: creation, listing with class counts, and adding images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Invalid, NotFound
from app.db.tables import Dataset, Image
from app.schemas.datasets import ClassCount, DatasetCreate, DatasetRead
from app.services.archives import ArchiveLimits, read_archive
from app.services.images import InvalidLabel, Upload, UploadResult, add_uploads, normalized_label


def create_dataset(session: Session, *, dataset_create: DatasetCreate) -> DatasetRead:
    """Create an empty dataset."""
    dataset = Dataset(name=dataset_create.name)
    session.add(dataset)
    session.flush()
    return dataset_read(session, dataset)


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def class_counts(session: Session, dataset_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Image.label, func.count()).where(Image.dataset_id == dataset_id).group_by(Image.label)
    ).all()
    return {label: count for label, count in sorted(rows)}


def dataset_read(session: Session, dataset: Dataset) -> DatasetRead:
    counts = class_counts(session, dataset.id)
    split_rows = session.execute(
        select(Image.split, func.count()).where(Image.dataset_id == dataset.id).group_by(Image.split)
    ).all()
    splits = {split or "unassigned": count for split, count in split_rows}
    return DatasetRead(
        id=dataset.id,
        name=dataset.name,
        num_images=sum(counts.values()),
        classes=[ClassCount(name=name, count=count) for name, count in counts.items()],
        splits=splits,
        created_at=dataset.created_at,
    )


def list_datasets(session: Session) -> list[DatasetRead]:
    datasets = session.scalars(select(Dataset).order_by(Dataset.id)).all()
    return [dataset_read(session, dataset) for dataset in datasets]


def add_labelled_files(
    session: Session,
    *,
    dataset_id: int,
    label: str,
    files: Iterable[tuple[str, bytes | None]],
    settings: Settings,
) -> UploadResult:
    """Add uploaded files under one label; `None` bytes mean the file was over the size limit."""
    get_dataset(session, dataset_id)
    try:
        label = normalized_label(label, max_length=settings.max_label_length)
    except InvalidLabel as exc:
        raise Invalid(f"label: {exc}") from None
    result = UploadResult()
    uploads: list[Upload] = []
    for filename, data in files:
        if data is None:
            result.reject(filename, f"larger than the {settings.max_image_bytes}-byte image limit")
        else:
            uploads.append(Upload(filename=filename, label=label, data=data))
    result.merge(
        add_uploads(session, dataset_id=dataset_id, uploads=uploads, max_pixels=settings.max_image_pixels)
    )
    return _checked(result)


def add_archive(session: Session, *, dataset_id: int, fileobj: IO[bytes], settings: Settings) -> UploadResult:
    """Add every image of a zip in the ImageFolder layout."""
    get_dataset(session, dataset_id)
    limits = ArchiveLimits(
        max_entries=settings.max_archive_entries,
        max_uncompressed_bytes=settings.max_archive_uncompressed_bytes,
        max_image_bytes=settings.max_image_bytes,
        max_label_length=settings.max_label_length,
    )
    result = UploadResult()
    result.merge(
        add_uploads(
            session,
            dataset_id=dataset_id,
            uploads=read_archive(fileobj, limits=limits, result=result),
            max_pixels=settings.max_image_pixels,
        )
    )
    return _checked(result)


def _checked(result: UploadResult) -> UploadResult:
    """A request in which nothing at all was usable is an error, not a silent 201."""
    if result.added == 0 and result.duplicates == 0:
        reasons = "; ".join(f"{r['filename']}: {r['reason']}" for r in result.rejected[:20])
        raise Invalid(f"no image could be added ({reasons or 'no files'})", rejected=result.rejected)
    return result
