"""Read a zip in the ImageFolder layout (`<class>/<image>`, optionally under `train/ val/ test/`)."""

from __future__ import annotations

import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from app.core.errors import Invalid, TooLarge
from app.services.images import SPLITS, Upload, UploadResult, validate_label

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IGNORED_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db"}


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_uncompressed_bytes: int
    max_image_bytes: int
    max_label_length: int


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """Path parts of an entry, or None when it is absolute or climbs out (zip slip)."""
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return None
    parts = PurePosixPath(name).parts
    if any(part in {"..", ""} for part in parts):
        return None
    return tuple(part for part in parts if part != ".")


def _common_root(paths: list[tuple[str, ...]]) -> int:
    """How many leading folders every entry shares and that are not part of the layout
    (a zip of `digits/0/a.png` has the wrapper folder `digits/`)."""
    strip = 0
    while paths and all(len(p) > strip + 2 for p in paths):
        first = paths[0][strip]
        if first.lower() in SPLIT_ALIASES or any(p[strip] != first for p in paths):
            break
        strip += 1
    return strip


def read_archive(fileobj: IO[bytes], *, limits: ArchiveLimits, result: UploadResult) -> Iterator[Upload]:
    """Yield the archive's images as uploads; entries that cannot be used are added to `result.rejected`."""
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise Invalid("file is not a zip archive") from None

    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if len(infos) > limits.max_entries:
            raise TooLarge(f"archive has {len(infos)} entries; the limit is {limits.max_entries}")
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_uncompressed_bytes:
            raise TooLarge(
                f"archive expands to {declared} bytes; the limit is {limits.max_uncompressed_bytes}"
            )

        entries: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        for info in infos:
            parts = _safe_parts(info.filename)
            if parts is None:
                result.reject(info.filename, "unsafe path (absolute or containing '..')")
                continue
            if _is_symlink(info) or any(p in IGNORED_PARTS or p.startswith(".") for p in parts):
                continue
            entries.append((info, parts))
        if not entries:
            raise Invalid("archive holds no images")

        strip = _common_root([parts for _, parts in entries])
        for info, full_parts in entries:
            parts = full_parts[strip:]
            split: str | None = None
            if len(parts) == 3 and parts[0].lower() in SPLIT_ALIASES:
                split, parts = SPLIT_ALIASES[parts[0].lower()], parts[1:]
            if len(parts) != 2:
                result.reject(info.filename, "not in the <class>/<image> or <split>/<class>/<image> layout")
                continue
            label = parts[0]
            reason = validate_label(label, max_length=limits.max_label_length)
            if reason:
                result.reject(info.filename, reason)
                continue
            if info.file_size > limits.max_image_bytes:
                result.reject(info.filename, f"larger than the {limits.max_image_bytes}-byte image limit")
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(limits.max_image_bytes + 1)  # bounded even if the header lies
            except (zipfile.BadZipFile, zlib.error, OSError, RuntimeError, NotImplementedError) as exc:
                result.reject(info.filename, f"cannot be extracted: {exc}")
                continue
            if len(data) > limits.max_image_bytes:
                result.reject(info.filename, f"larger than the {limits.max_image_bytes}-byte image limit")
                continue
            assert split is None or split in SPLITS
            yield Upload(filename=info.filename, label=label, data=data, split=split)
