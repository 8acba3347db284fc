"""Browsing a dataset's stored images: listing them per class and small thumbnails of each."""

from __future__ import annotations

import io
import unicodedata

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from app.core.errors import Invalid, NotFound
from app.db.tables import Image
from app.services.datasets import get_dataset
from models.preprocessing import ImageDecodeError, decode_image


def list_images(
    session: Session, *, dataset_id: int, label: str | None, limit: int, offset: int
) -> list[Image]:
    """A page of the dataset's images (optionally of one class), oldest first."""
    get_dataset(session, dataset_id)
    query = select(Image).where(Image.dataset_id == dataset_id).order_by(Image.id).limit(limit).offset(offset)
    if label is not None:
        query = query.where(Image.label == unicodedata.normalize("NFC", label))  # as stored
    return list(session.scalars(query))


def thumbnail_png(session: Session, *, dataset_id: int, image_id: int, size: int, max_pixels: int) -> bytes:
    """The image scaled to fit `size` x `size` (never enlarged beyond 4x), as PNG."""
    image = session.scalar(
        select(Image).options(undefer(Image.data)).where(Image.id == image_id, Image.dataset_id == dataset_id)
    )
    if image is None:
        raise NotFound(f"image {image_id} not found in dataset {dataset_id}")
    if image.width * image.height > max_pixels:
        raise Invalid(f"image {image_id} has more than {max_pixels} pixels")
    try:  # the same allow-listed, bounded decode as uploads and training
        picture = decode_image(image.data, max_pixels=max_pixels)
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
