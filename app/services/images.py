"""Check uploaded bytes and insert them as images, counting duplicates instead of storing them twice."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.tables import Image, utcnow
from models.preprocessing import ImageDecodeError, decode_image

INSERT_CHUNK = 200
SPLITS = ("train", "val", "test")


@dataclass
class Upload:
    """One candidate image: where it came from, and what it claims to be."""

    filename: str
    label: str
    data: bytes
    split: str | None = None


@dataclass
class UploadResult:
    added: int = 0
    duplicates: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)

    def reject(self, filename: str, reason: str) -> None:
        self.rejected.append({"filename": filename, "reason": reason})

    def merge(self, other: UploadResult) -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)


def stored_name(name: str, limit: int = 500) -> str:
    """A client's file name as kept for display: control characters (NUL breaks PostgreSQL text) become
    '?', and only the last `limit` characters are kept. Never used as a path."""
    return "".join("?" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in name[-limit:])


def validate_label(label: str, *, max_length: int) -> str | None:
    """The reason a class name is unusable, or None. Class names become folder-like identifiers."""
    if not label or not label.strip():
        return "label is empty"
    if label != label.strip():
        return "label has leading or trailing spaces"
    if len(label) > max_length:
        return f"label is longer than {max_length} characters"
    if any(ch in label for ch in "/\\") or any(ord(ch) < 32 for ch in label):
        return "label contains a slash or a control character"
    return None


def _row(dataset_id: int, upload: Upload, digest: str, max_pixels: int | None) -> dict[str, Any] | str:
    """The image row for an upload, or the reason it is rejected."""
    try:
        image = decode_image(upload.data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return str(exc)
    return {
        "dataset_id": dataset_id,
        "sha256": digest,
        "label": upload.label,
        "split": upload.split,
        "filename": stored_name(upload.filename),
        "format": image.format or "unknown",
        "mode": image.mode,
        "width": image.width,
        "height": image.height,
        "size_bytes": len(upload.data),
        "data": upload.data,
        "created_at": utcnow(),
    }


def _insert_ignoring_duplicates(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert rows, skipping those whose (dataset, hash) exists; returns how many were inserted.

    ON CONFLICT DO NOTHING keeps two concurrent uploads of the same bytes from failing on the
    unique key, on SQLite and PostgreSQL alike.
    """
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is None:
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    stmt = insert(Image).on_conflict_do_nothing(index_elements=["dataset_id", "sha256"]).returning(Image.id)
    # Count RETURNING rows, not `rowcount`: SQLAlchemy adds RETURNING to an INSERT on PostgreSQL by
    # itself, and then rowcount is -1. One statement per row keeps the count exact.
    return sum(len(session.execute(stmt.values(**row)).all()) for row in rows)


def add_uploads(
    session: Session, *, dataset_id: int, uploads: Iterable[Upload], max_pixels: int | None = None
) -> UploadResult:
    """Decode-check and store uploads; a bad file is rejected by name and the rest still go in."""
    result = UploadResult()
    seen: set[str] = set()
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        inserted = _insert_ignoring_duplicates(session, pending)
        result.added += inserted
        result.duplicates += len(pending) - inserted
        pending.clear()

    for upload in uploads:
        digest = hashlib.sha256(upload.data).hexdigest()
        if digest in seen:
            result.duplicates += 1
            continue
        row = _row(dataset_id, upload, digest, max_pixels)
        if isinstance(row, str):
            result.reject(upload.filename, row)
            continue
        seen.add(digest)
        pending.append(row)
        if len(pending) >= INSERT_CHUNK:
            flush()
    flush()
    return result
