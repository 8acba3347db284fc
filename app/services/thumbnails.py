"""Browsing a dataset's stored images: listing them per class and small thumbnails of each."""

from __future__ import annotations

import io
import threading
import unicodedata

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from app.core.errors import Busy, Invalid, NotFound
from app.db.tables import Image
from app.services.datasets import get_dataset
from models.imaging import ImageDecodeError, decode_reduced


def list_images(
    session: Session, *, dataset_id: int, label: str | None, limit: int, offset: int
) -> list[Image]:
    """A page of the dataset's images (optionally of one class), oldest first."""
    get_dataset(session, dataset_id)
    query = select(Image).where(Image.dataset_id == dataset_id).order_by(Image.id).limit(limit).offset(offset)
    if label is not None:
        query = query.where(Image.label == unicodedata.normalize("NFC", label))  # as stored
    return list(session.scalars(query))


class ThumbnailSlots:
    """At most `concurrency` thumbnails decode at once: a large stored image costs its full decoded size
    while it is decoded (a 9400x9400 PNG, 265 MB), and 8 at once took the API from 1.3 to 4.0 GB.
    A request that waits longer than `wait_seconds` for a slot is a 503 with Retry-After."""

    def __init__(self, *, concurrency: int, wait_seconds: float, retry_after_seconds: int) -> None:
        self._slots = threading.BoundedSemaphore(concurrency)
        self.concurrency = concurrency
        self.wait_seconds = wait_seconds
        self.retry_after_seconds = retry_after_seconds

    def acquire(self) -> None:
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise Busy(
                f"{self.concurrency} thumbnails are being made, the most at once "
                "(TRAINSERVE_THUMBNAIL_CONCURRENCY); retry later",
                retry_after=self.retry_after_seconds,
            )

    def release(self) -> None:
        self._slots.release()


def thumbnail_png(
    session: Session, *, dataset_id: int, image_id: int, size: int, max_pixels: int, slots: ThumbnailSlots
) -> bytes:
    """The image scaled to fit `size` x `size` (never enlarged beyond 4x), as PNG."""
    image = session.scalar(
        select(Image).options(undefer(Image.data)).where(Image.id == image_id, Image.dataset_id == dataset_id)
    )
    if image is None:
        raise NotFound(f"image {image_id} not found in dataset {dataset_id}")
    if image.width * image.height > max_pixels:
        raise Invalid(f"image {image_id} has more than {max_pixels} pixels")
    slots.acquire()
    try:
        return _render(image.data, image_id=image_id, size=size, max_pixels=max_pixels)
    finally:
        slots.release()


def _render(data: bytes, *, image_id: int, size: int, max_pixels: int) -> bytes:
    try:  # the same allow-listed, bounded decoder as uploads and training, decoding no larger than needed
        picture = decode_reduced(data, box=size, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise Invalid(f"image {image_id}: {exc}") from None
    with picture:
        if picture.mode not in ("L", "RGB", "RGBA"):
            picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        scale = min(size / picture.width, size / picture.height, 4.0)
        target = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        # Tiny images (8x8 digits) are enlarged with hard pixels, not blurred; large ones are smoothed.
        resample = PILImage.Resampling.NEAREST if scale > 1 else PILImage.Resampling.LANCZOS
        picture = picture.resize(target, resample)
        out = io.BytesIO()
        picture.save(out, "PNG", optimize=False)
    return out.getvalue()
