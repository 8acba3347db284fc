"""From the database's image rows to one uint8 tensor, decoded once per (dataset contents, image size,
channels) into the memory-mapped cache of `workers.cache`: never per epoch, and not again by the next
job on the same images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.session import read_scope
from app.db.tables import Image
from models.preprocessing import GRAYSCALE_MODES, Preprocessing
from workers.cache import CacheEntry, CacheItem, open_or_build


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """What the worker knows of an image before decoding it."""

    id: int
    label: str
    split: str | None
    mode: str
    sha256: str = ""


def list_images(session: Session, dataset_id: int, *, max_id: int | None = None) -> list[ImageRecord]:
    """The dataset's images in upload order; `max_id` pins the set a job's first attempt saw."""
    query = select(Image.id, Image.label, Image.split, Image.mode, Image.sha256).where(
        Image.dataset_id == dataset_id
    )
    if max_id is not None:
        query = query.where(Image.id <= max_id)
    rows = session.execute(query.order_by(Image.id)).all()
    return [ImageRecord(id=r.id, label=r.label, split=r.split, mode=r.mode, sha256=r.sha256) for r in rows]


def infer_channels(records: list[ImageRecord]) -> int:
    """1 when every image is grayscale (digits, X-rays), else 3."""
    return 1 if all(record.mode in GRAYSCALE_MODES for record in records) else 3


def fetch_image_bytes(settings: Settings) -> Callable[[Sequence[int]], list[tuple[int, bytes]]]:
    """A short read per chunk of ids: no database snapshot is held while the images decode."""

    def fetch(ids: Sequence[int]) -> list[tuple[int, bytes]]:
        with read_scope(settings) as session:
            rows = session.execute(select(Image.id, Image.data).where(Image.id.in_(list(ids)))).all()
        return [(row.id, row.data) for row in rows]

    return fetch


def load_images(
    settings: Settings,
    records: list[ImageRecord],
    preprocessing: Preprocessing,
    *,
    on_progress: Callable[[int, int], None],
    on_wait: Callable[[], None] = lambda: None,
) -> tuple[torch.Tensor, CacheEntry]:
    """All images as uint8 (N, C, H, W) in `records` order, memory-mapped from the decoded-image cache
    (built first when this is the first job on these images at this size)."""
    entry = open_or_build(
        settings.cache_dir,
        [CacheItem(id=r.id, sha256=r.sha256, label=r.label) for r in records],
        image_size=preprocessing.image_size,
        channels=preprocessing.channels,
        fetch=fetch_image_bytes(settings),
        on_progress=on_progress,
        on_wait=on_wait,
        processes=settings.cache_build_processes,
        pool_min_images=settings.cache_pool_min_images,
        max_bytes=settings.cache_max_bytes,
    )
    return torch.from_numpy(entry.open()), entry


def decode_dataset(
    settings: Settings,
    records: list[ImageRecord],
    preprocessing: Preprocessing,
    *,
    on_progress: Callable[[int, int], None],
) -> torch.Tensor:
    """All images as uint8 (N, C, H, W), in `records` order (through the cache)."""
    return load_images(settings, records, preprocessing, on_progress=on_progress)[0]
