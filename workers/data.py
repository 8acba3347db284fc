"""From the database's image rows to one uint8 tensor, decoded once per job (never per epoch)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.session import read_scope
from app.db.tables import Image
from models.preprocessing import GRAYSCALE_MODES, Preprocessing, decode_image, to_uint8

FETCH_CHUNK = 256


@dataclass(frozen=True)
class ImageRecord:
    """What the worker knows of an image before decoding it."""

    id: int
    label: str
    split: str | None
    mode: str


def list_images(session: Session, dataset_id: int, *, max_id: int | None = None) -> list[ImageRecord]:
    """The dataset's images in upload order; `max_id` pins the set a job's first attempt saw."""
    query = select(Image.id, Image.label, Image.split, Image.mode).where(Image.dataset_id == dataset_id)
    if max_id is not None:
        query = query.where(Image.id <= max_id)
    rows = session.execute(query.order_by(Image.id)).all()
    return [ImageRecord(id=r.id, label=r.label, split=r.split, mode=r.mode) for r in rows]


def infer_channels(records: list[ImageRecord]) -> int:
    """1 when every image is grayscale (digits, X-rays), else 3."""
    return 1 if all(record.mode in GRAYSCALE_MODES for record in records) else 3


def decode_dataset(
    settings: Settings,
    records: list[ImageRecord],
    preprocessing: Preprocessing,
    *,
    on_progress: Callable[[int, int], None],
) -> torch.Tensor:
    """All images as uint8 (N, C, H, W), in `records` order, decoded on every core."""
    size = preprocessing.image_size
    out = torch.empty((len(records), preprocessing.channels, size, size), dtype=torch.uint8)
    position = {record.id: index for index, record in enumerate(records)}

    def decode(item: tuple[int, bytes]) -> None:
        image_id, data = item
        out[position[image_id]] = to_uint8(decode_image(data), preprocessing)

    done = 0
    ids = [record.id for record in records]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(ids), FETCH_CHUNK):
            chunk = ids[start : start + FETCH_CHUNK]
            with read_scope(settings) as session:  # short reads: no snapshot held while decoding
                rows = session.execute(select(Image.id, Image.data).where(Image.id.in_(chunk))).all()
            list(pool.map(decode, [(row.id, row.data) for row in rows]))
            done += len(rows)
            on_progress(done, len(ids))
    if done != len(ids):
        raise RuntimeError(f"{len(ids) - done} images disappeared from the dataset while loading")
    return out
