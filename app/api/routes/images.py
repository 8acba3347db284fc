"""Browsing a dataset's images: a page of them per class, and thumbnails (for the dashboard)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import IdPath, SessionDep, SettingsDep
from app.schemas.images import ImageRead
from app.services import thumbnails

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.get("/{dataset_id}/images", response_model=list[ImageRead])
def list_images(
    dataset_id: IdPath,
    session: SessionDep,
    label: Annotated[str | None, Query(description="Only this class.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[ImageRead]:
    """The dataset's images (metadata, no bytes), oldest first; page with `limit` and `offset`."""
    images = thumbnails.list_images(session, dataset_id=dataset_id, label=label, limit=limit, offset=offset)
    return [ImageRead.model_validate(image) for image in images]


@router.get(
    "/{dataset_id}/images/{image_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
)
def image_thumbnail(
    request: Request,
    dataset_id: IdPath,
    image_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    size: Annotated[int, Query(ge=8, le=512, description="Longest side in pixels.")] = 96,
) -> Response:
    """A stored image scaled to fit `size` x `size`, as PNG (503 with Retry-After while the server is
    making as many thumbnails as it allows at once)."""
    png = thumbnails.thumbnail_png(
        session,
        dataset_id=dataset_id,
        image_id=image_id,
        size=size,
        max_pixels=settings.max_image_pixels,
        slots=request.app.state.thumbnail_slots,
    )
    # Stored images never change, so a thumbnail can be cached for as long as the browser likes.
    return Response(content=png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
