"""Starting weights uploaded by clients: parsed without unpickling code, stored as safetensors."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from app.core.config import Settings
from app.core.errors import Invalid, NotFound, TooLarge
from app.db.tables import WeightsFile
from app.services.images import stored_name
from models.weights_file import (
    WeightsFileError,
    WeightsLimits,
    WeightsTooLarge,
    parse_weights,
    to_safetensors,
)


def weights_limits(settings: Settings) -> WeightsLimits:
    return WeightsLimits(
        expanded_bytes=settings.max_weights_expanded_bytes,
        expansion=settings.max_weights_expansion,
        tensors=settings.max_weights_tensors,
        metadata_bytes=settings.max_weights_metadata_bytes,
    )


def create_weights(session: Session, *, filename: str, data: bytes, settings: Settings) -> WeightsFile:
    """Validate and store a weight file; a file that is not plain tensors is a 422 saying why, one
    that would expand past the limits a 413 naming the limit (checked before anything is copied)."""
    try:
        parsed = parse_weights(data, weights_limits(settings))
        architecture = parsed.meta.get("architecture")
        meta = {**parsed.meta, "source_format": parsed.source_format}
        stored = to_safetensors(parsed, meta)
    except WeightsTooLarge as exc:
        raise TooLarge(f"file: {exc}") from None
    except WeightsFileError as exc:
        raise Invalid(f"file: {exc}") from None
    row = WeightsFile(
        filename=stored_name(filename),
        source_format=parsed.source_format,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        num_tensors=len(parsed.state_dict),
        num_parameters=parsed.num_parameters,
        architecture=architecture[:64] if isinstance(architecture, str) else None,
        meta=meta,
        data=stored,
    )
    session.add(row)
    session.flush()
    return row


def get_weights(session: Session, weights_id: int, *, with_data: bool = False) -> WeightsFile:
    query = select(WeightsFile).where(WeightsFile.id == weights_id)
    if with_data:
        query = query.options(undefer(WeightsFile.data))
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"weights {weights_id} not found")
    return row


def list_weights(session: Session) -> list[WeightsFile]:
    return list(session.scalars(select(WeightsFile).order_by(WeightsFile.id)))
