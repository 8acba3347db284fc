"""Check uploaded bytes and insert them as images, counting duplicates instead of storing them twice."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
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
    # The same bytes already stored (or earlier in this request) under another label or split: kept
    # as they were, counted as a duplicate, and named here so the disagreement does not disappear.
    conflicts: list[dict[str, str | None]] = field(default_factory=list)

    def reject(self, filename: str, reason: str) -> None:
        self.rejected.append({"filename": filename, "reason": reason})

    def conflict(self, upload: Upload, existing: Placement) -> None:
        self.conflicts.append(
            {
                "filename": upload.filename,
                "label": upload.label,
                "split": upload.split,
                "existing_filename": existing.filename,
                "existing_label": existing.label,
                "existing_split": existing.split,
            }
        )

    def merge(self, other: UploadResult) -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)
        self.conflicts.extend(other.conflicts)


@dataclass(frozen=True)
class Placement:
    """Where some bytes sit in a dataset: their label and split (and the file they came in as)."""

    filename: str
    label: str
    split: str | None


def stored_name(name: str, limit: int = 500) -> str:
    """A client's file name as kept for display: control characters (NUL breaks PostgreSQL text) become
    '?', and only the last `limit` characters are kept. Never used as a path."""
    return "".join("?" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in name[-limit:])


class InvalidLabel(ValueError):
    """A class name that cannot be used; the message says why."""


# Unicode categories refused in labels: controls (Cc), format characters (Cf: bidi overrides and
# isolates, zero-width spaces and joiners, the BOM), surrogates, and line/paragraph separators. They
# make two labels that look the same differ, or reorder what a person reads.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def normalized_label(label: str, *, max_length: int) -> str:
    """A class name in NFC (so `é` typed two ways is one class), or InvalidLabel saying why it is
    unusable. Class names become folder-like identifiers, shown to people."""
    label = unicodedata.normalize("NFC", label)
    if not label or not label.strip():
        raise InvalidLabel("label is empty")
    if label != label.strip():
        raise InvalidLabel("label has leading or trailing spaces")
    if len(label) > max_length:
        raise InvalidLabel(f"label is longer than {max_length} characters")
    if any(ch in label for ch in "/\\") or any(ord(ch) < 32 for ch in label):
        raise InvalidLabel("label contains a slash or a control character")
    hidden = next((ch for ch in label if unicodedata.category(ch) in _INVISIBLE_CATEGORIES), None)
    if hidden is not None:
        raise InvalidLabel(
            f"label contains an invisible or direction-changing character (U+{ord(hidden):04X} "
            f"{unicodedata.name(hidden, 'unnamed')})"
        )
    return label


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


def _insert_ignoring_duplicates(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert rows, skipping those whose (dataset, hash) exists; returns the hashes inserted.

    ON CONFLICT DO NOTHING keeps two concurrent uploads of the same bytes from failing on the
    unique key, on SQLite and PostgreSQL alike.
    """
    dialect = session.get_bind().dialect.name
    keys = ["dataset_id", "sha256"]
    if dialect == "sqlite":
        stmt = sqlite.insert(Image).on_conflict_do_nothing(index_elements=keys).returning(Image.sha256)
    elif dialect == "postgresql":
        stmt = postgresql.insert(Image).on_conflict_do_nothing(index_elements=keys).returning(Image.sha256)
    else:
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    # Read RETURNING rows, not `rowcount`: SQLAlchemy adds RETURNING to an INSERT on PostgreSQL by
    # itself, and then rowcount is -1. One statement per row keeps the answer exact.
    return {digest for row in rows for digest in session.scalars(stmt.values(**row))}


def _stored_placements(session: Session, dataset_id: int, digests: list[str]) -> dict[str, Placement]:
    rows = session.execute(
        select(Image.sha256, Image.filename, Image.label, Image.split).where(
            Image.dataset_id == dataset_id, Image.sha256.in_(digests)
        )
    )
    return {digest: Placement(filename, label, split) for digest, filename, label, split in rows}


def _placement(upload: Upload) -> Placement:
    return Placement(stored_name(upload.filename), upload.label, upload.split)


def _disagree(upload: Upload, existing: Placement) -> bool:
    return (upload.label, upload.split) != (existing.label, existing.split)


def add_uploads(
    session: Session, *, dataset_id: int, uploads: Iterable[Upload], max_pixels: int | None = None
) -> UploadResult:
    """Decode-check and store uploads; a bad file is rejected by name and the rest still go in.
    Bytes already stored (or earlier in the request) count as a duplicate, and as a conflict too when
    they came with another label or split."""
    result = UploadResult()
    seen: dict[str, Placement] = {}
    pending: list[tuple[Upload, dict[str, Any]]] = []

    def flush() -> None:
        inserted = _insert_ignoring_duplicates(session, [row for _, row in pending])
        result.added += len(inserted)
        skipped = [(upload, row["sha256"]) for upload, row in pending if row["sha256"] not in inserted]
        result.duplicates += len(skipped)
        if skipped:
            stored = _stored_placements(session, dataset_id, [digest for _, digest in skipped])
            for upload, digest in skipped:
                if digest in stored and _disagree(upload, stored[digest]):
                    result.conflict(upload, stored[digest])
        pending.clear()

    for upload in uploads:
        digest = hashlib.sha256(upload.data).hexdigest()
        if digest in seen:
            result.duplicates += 1
            if _disagree(upload, seen[digest]):
                result.conflict(upload, seen[digest])
            continue
        row = _row(dataset_id, upload, digest, max_pixels)
        if isinstance(row, str):
            result.reject(upload.filename, row)
            continue
        seen[digest] = _placement(upload)
        pending.append((upload, row))
        if len(pending) >= INSERT_CHUNK:
            flush()
    flush()
    return result
