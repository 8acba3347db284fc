"""Read a zip in the ImageFolder layout (`<class>/<image>`, optionally under `train/ val/ test/`).

The archive is hostile until proven otherwise. Its entries are counted from the central directory record
by record before the zip is opened (so a directory of millions of entries costs nothing), entries whose
data overlap (the trick of non-recursive zip bombs) refuse the whole archive before anything is
inflated, the bytes actually inflated are counted against the limit (never the sizes the archive
declares), nested archives are not opened, symlinks are ignored, names that are absolute or climb out
are rejected, and members are only ever read into memory: nothing is written to a path built from an
entry name.
"""

from __future__ import annotations

import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from app.core.errors import Invalid, TooLarge
from app.services.images import SPLITS, InvalidLabel, Upload, UploadResult, normalized_label

NESTED_ARCHIVE_SUFFIXES = (
    ".zip",
    ".tar",
    ".tgz",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".7z",
    ".rar",
    ".jar",
    ".whl",
)
CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # zipfile.structCentralDir: 46 bytes
LOCAL_HEADER_SIZE = 30  # fixed part of a local file header, before its name and extra field
UTF8_NAME_FLAG = 0x800  # general purpose bit 11: the name (and comment) are UTF-8
UNICODE_PATH_EXTRA = 0x7075  # Info-ZIP Unicode Path field: a UTF-8 name for a name stored in cp437
EXTRA_HEADER = struct.Struct("<HH")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IGNORED_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db"}


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_uncompressed_bytes: int
    max_image_bytes: int
    max_label_length: int


def raw_name(info: zipfile.ZipInfo) -> bytes:
    """The entry's name as the archive stores it. zipfile decoded it as UTF-8 when bit 11 is set and
    as cp437 otherwise (the zip specification's default), and both round-trip exactly; measuring the
    UTF-8 re-encoding instead made every non-ASCII cp437 name look longer than it is."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & UTF8_NAME_FLAG else "cp437")


def entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as the zip says: UTF-8 when flagged; otherwise the Info-ZIP Unicode Path
    field when it has one for exactly this name (its CRC matches), else cp437 (older Windows tools,
    macOS Archive Utility)."""
    if info.flag_bits & UTF8_NAME_FLAG:
        return info.filename
    extra, offset = info.extra, 0
    while offset + EXTRA_HEADER.size <= len(extra):
        kind, size = EXTRA_HEADER.unpack_from(extra, offset)
        body = extra[offset + EXTRA_HEADER.size : offset + EXTRA_HEADER.size + size]
        offset += EXTRA_HEADER.size + size
        if kind != UNICODE_PATH_EXTRA or len(body) < 5 or body[0] != 1:
            continue
        (crc,) = struct.unpack_from("<L", body, 1)
        if crc != zlib.crc32(raw_name(info)):
            continue  # the name was changed by a tool that did not update the field: not this name
        try:
            return body[5:].decode("utf-8").split("\x00", 1)[0]
        except UnicodeDecodeError:
            continue
    return info.filename


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


def _count_entries(fileobj: IO[bytes], *, limit: int) -> int:
    """Entries in the central directory, walked record by record (no ZipInfo objects), stopping as
    soon as there are more than `limit`."""
    endrec = zipfile._EndRecData(fileobj)  # stable since Python 2; handles zip64
    if endrec is None:
        raise Invalid("file is not a zip archive")
    if endrec[zipfile._ECD_ENTRIES_TOTAL] > limit:
        raise TooLarge(f"archive has {endrec[zipfile._ECD_ENTRIES_TOTAL]} entries; the limit is {limit}")
    size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]
    start = endrec[zipfile._ECD_LOCATION] - size_cd
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if start < 0 or offset_cd < 0:
        raise Invalid("file is not a zip archive (bad central directory)")
    fileobj.seek(start)
    count, position = 0, 0
    while position + CENTRAL_HEADER.size <= size_cd:
        record = fileobj.read(CENTRAL_HEADER.size)
        if len(record) < CENTRAL_HEADER.size or record[:4] != zipfile.stringCentralDir:
            break  # zipfile itself reports a malformed directory when it opens the archive
        fields = CENTRAL_HEADER.unpack(record)
        variable = fields[12] + fields[13] + fields[14]  # name, extra field, comment lengths
        fileobj.seek(variable, 1)
        position += CENTRAL_HEADER.size + variable
        count += 1
        if count > limit:
            raise TooLarge(f"archive has more than {limit} entries; the limit is {limit}")
    fileobj.seek(0)
    return count


def _declared_total(infos: list[zipfile.ZipInfo]) -> int:
    """What the archive says it expands to: refuses an honest bomb at once. Not trusted beyond that:
    the bytes actually inflated are counted too."""
    return sum(info.file_size for info in infos)


def _check_no_overlap(archive: zipfile.ZipFile) -> None:
    """Refuse entries whose data overlap another's: one compressed stream shared by thousands of
    entries is how a 10 MB zip inflates to terabytes. Checked from the directory, before inflating."""
    infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
    ends = [info.header_offset for info in infos[1:]] + [archive.start_dir] if infos else []
    for info, next_start in zip(infos, ends, strict=True):
        # The smallest the entry can be: fixed header, its name, its data (the extra field may add more).
        end = info.header_offset + LOCAL_HEADER_SIZE + len(raw_name(info)) + info.compress_size
        if end > next_start:
            raise Invalid(
                f"archive entries overlap ({info.orig_filename!r} runs into the next entry): "
                "refused as a zip bomb"
            )


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
        _count_entries(fileobj, limit=limits.max_entries)
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError):
        raise Invalid("file is not a zip archive") from None

    with archive:
        _check_no_overlap(archive)
        infos = [info for info in archive.infolist() if not info.is_dir()]
        declared = _declared_total(infos)
        if declared > limits.max_uncompressed_bytes:
            raise TooLarge(
                f"archive expands to {declared} bytes; the limit is {limits.max_uncompressed_bytes}"
            )

        entries: list[tuple[zipfile.ZipInfo, str, tuple[str, ...]]] = []
        for info in infos:
            name = entry_name(info)
            parts = _safe_parts(name)
            if parts is None:
                result.reject(name, "unsafe path (absolute or containing '..')")
                continue
            if _is_symlink(info) or any(p in IGNORED_PARTS or p.startswith(".") for p in parts):
                continue
            if parts[-1].lower().endswith(NESTED_ARCHIVE_SUFFIXES):
                result.reject(name, "nested archive: not opened (upload it on its own)")
                continue
            entries.append((info, name, parts))
        if not entries:
            reasons = "; ".join(f"{r['filename']}: {r['reason']}" for r in result.rejected[:20])
            raise Invalid(
                "archive holds no images" + (f" ({reasons})" if reasons else ""), rejected=result.rejected
            )

        strip = _common_root([parts for _, _, parts in entries])
        inflated = 0
        for info, name, full_parts in entries:
            parts = full_parts[strip:]
            split: str | None = None
            if len(parts) == 3 and parts[0].lower() in SPLIT_ALIASES:
                split, parts = SPLIT_ALIASES[parts[0].lower()], parts[1:]
            if len(parts) != 2:
                result.reject(name, "not in the <class>/<image> or <split>/<class>/<image> layout")
                continue
            try:
                label = normalized_label(parts[0], max_length=limits.max_label_length)
            except InvalidLabel as exc:
                result.reject(name, str(exc))
                continue
            if info.file_size > limits.max_image_bytes:
                result.reject(name, f"larger than the {limits.max_image_bytes}-byte image limit")
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(limits.max_image_bytes + 1)  # bounded even if the header lies
            except (zipfile.BadZipFile, zlib.error, OSError, RuntimeError, NotImplementedError) as exc:
                result.reject(name, f"cannot be extracted: {exc}")
                continue
            inflated += len(data)
            if inflated > limits.max_uncompressed_bytes:  # what was really inflated, whatever was declared
                raise TooLarge(
                    f"archive inflates to more than {limits.max_uncompressed_bytes} bytes; "
                    f"the limit is {limits.max_uncompressed_bytes}"
                )
            if len(data) > limits.max_image_bytes:
                result.reject(name, f"larger than the {limits.max_image_bytes}-byte image limit")
                continue
            assert split is None or split in SPLITS
            yield Upload(filename=name, label=label, data=data, split=split)
