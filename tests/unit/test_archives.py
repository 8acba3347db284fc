"""`read_archive`: the ImageFolder zip layouts, and every way a zip can be hostile or malformed."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from app.core.errors import Invalid, TooLarge
from app.services import archives
from app.services.archives import ArchiveLimits, read_archive
from app.services.images import Upload, UploadResult
from tests.factories import image_bytes, noise_png, zip_bytes, zip_entries

PNG = noise_png(0)


def limits(**overrides: int) -> ArchiveLimits:
    values = {
        "max_entries": 1000,
        "max_uncompressed_bytes": 10_000_000,
        "max_image_bytes": 100_000,
        "max_label_length": 64,
    }
    values.update(overrides)
    return ArchiveLimits(**values)


def read(data: bytes, **overrides: int) -> tuple[list[Upload], UploadResult]:
    result = UploadResult()
    uploads = list(read_archive(io.BytesIO(data), limits=limits(**overrides), result=result))
    return uploads, result


def summary(uploads: list[Upload]) -> set[tuple[str, str, str | None]]:
    return {(u.filename, u.label, u.split) for u in uploads}


def rejected_names(result: UploadResult) -> set[str]:
    return {entry["filename"] for entry in result.rejected}


def symlink(name: str, target: str = "../../etc/passwd") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info, target.encode()


# ---------------------------------------------------------------- layouts


def test_class_folder_layout() -> None:
    data = zip_bytes([("cat/a.png", noise_png(1)), ("cat/b.png", noise_png(2)), ("dog/c.png", noise_png(3))])
    uploads, result = read(data)
    assert summary(uploads) == {
        ("cat/a.png", "cat", None),
        ("cat/b.png", "cat", None),
        ("dog/c.png", "dog", None),
    }
    assert result.rejected == []
    by_name = {u.filename: u.data for u in uploads}
    assert by_name["cat/b.png"] == noise_png(2), "the member's bytes are passed through unchanged"


def test_single_class_archive() -> None:
    uploads, _ = read(zip_bytes([("cat/a.png", PNG), ("cat/b.png", noise_png(9))]))
    assert {u.label for u in uploads} == {"cat"}
    assert len(uploads) == 2


def test_wrapper_folder_is_stripped() -> None:
    data = zip_bytes([("digits/0/a.png", noise_png(1)), ("digits/1/b.png", noise_png(2))])
    uploads, result = read(data)
    assert summary(uploads) == {("digits/0/a.png", "0", None), ("digits/1/b.png", "1", None)}
    assert result.rejected == []


def test_two_wrapper_folders_are_stripped() -> None:
    data = zip_bytes([("home/me/0/a.png", noise_png(1)), ("home/me/1/b.png", noise_png(2))])
    uploads, _ = read(data)
    assert {u.label for u in uploads} == {"0", "1"}


def test_wrapper_folder_with_a_single_class_is_stripped() -> None:
    uploads, _ = read(zip_bytes([("digits/7/a.png", noise_png(1)), ("digits/7/b.png", noise_png(2))]))
    assert {u.label for u in uploads} == {"7"}


def test_directory_entries_are_not_images() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.mkdir("digits")
        archive.mkdir("digits/0")
        archive.writestr("digits/0/a.png", PNG)
    uploads, result = read(buffer.getvalue(), max_entries=3)  # directories count as entries too
    assert summary(uploads) == {("digits/0/a.png", "0", None)}
    assert result.rejected == []


@pytest.mark.parametrize("val_folder", ["val", "valid", "validation", "VAL", "Valid"])
def test_split_folders(val_folder: str) -> None:
    data = zip_bytes(
        [
            ("train/cat/a.png", noise_png(1)),
            ("train/dog/b.png", noise_png(2)),
            (f"{val_folder}/cat/c.png", noise_png(3)),
            ("test/dog/d.png", noise_png(4)),
        ]
    )
    uploads, result = read(data)
    assert summary(uploads) == {
        ("train/cat/a.png", "cat", "train"),
        ("train/dog/b.png", "dog", "train"),
        (f"{val_folder}/cat/c.png", "cat", "val"),
        ("test/dog/d.png", "dog", "test"),
    }
    assert result.rejected == []


def test_split_folders_under_a_wrapper() -> None:
    data = zip_bytes([("ds/train/cat/a.png", noise_png(1)), ("ds/test/cat/b.png", noise_png(2))])
    uploads, _ = read(data)
    assert summary(uploads) == {("ds/train/cat/a.png", "cat", "train"), ("ds/test/cat/b.png", "cat", "test")}


def test_only_a_train_folder_is_a_split_not_a_wrapper() -> None:
    data = zip_bytes([("train/cat/a.png", noise_png(1)), ("train/dog/b.png", noise_png(2))])
    uploads, _ = read(data)
    assert summary(uploads) == {("train/cat/a.png", "cat", "train"), ("train/dog/b.png", "dog", "train")}


def test_a_class_may_be_called_like_a_split() -> None:
    data = zip_bytes([("test/a.png", noise_png(1)), ("train/b.png", noise_png(2))])
    uploads, _ = read(data)
    assert summary(uploads) == {("test/a.png", "test", None), ("train/b.png", "train", None)}


def test_non_image_members_are_passed_on_for_the_decoder_to_judge() -> None:
    # read_archive checks layout and limits; whether bytes are an image is add_uploads' job
    uploads, _ = read(zip_bytes([("cat/notes.txt", b"hello"), ("cat/a.png", PNG)]))
    assert {u.filename for u in uploads} == {"cat/notes.txt", "cat/a.png"}


def test_stored_and_deflated_members_read_the_same() -> None:
    entries = [("cat/a.png", noise_png(1)), ("dog/b.jpg", image_bytes(fmt="JPEG"))]
    stored, _ = read(zip_entries(entries, compression=zipfile.ZIP_STORED))
    deflated, _ = read(zip_entries(entries, compression=zipfile.ZIP_DEFLATED))
    assert {u.filename: u.data for u in stored} == {u.filename: u.data for u in deflated} == dict(entries)


# ---------------------------------------------------------------- hostile entries


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "cat/../../evil.png",
        "/abs.png",
        "/cat/abs.png",
        "\\cat\\x.png",
        "C:/cat/x.png",
        "cat/./../x.png",
    ],
)
def test_unsafe_paths_are_rejected_by_name(name: str) -> None:
    data = zip_entries([(name, PNG), ("cat/ok.png", noise_png(5))])
    uploads, result = read(data)
    assert summary(uploads) == {("cat/ok.png", "cat", None)}
    assert rejected_names(result) == {name}
    assert "unsafe" in result.rejected[0]["reason"]


def test_macos_metadata_and_dotfiles_are_ignored() -> None:
    data = zip_bytes(
        [
            ("digits/0/a.png", noise_png(1)),
            ("digits/1/b.png", noise_png(2)),
            ("__MACOSX/digits/0/._a.png", b"\x00\x05\x16\x07resource fork"),
            ("digits/.DS_Store", b"\x00\x00\x00\x01Bud1"),
            ("digits/0/.hidden.png", noise_png(3)),
            (".git/objects/ab", b"x"),
            ("digits/1/Thumbs.db", b"thumbs"),
        ]
    )
    uploads, result = read(data)
    # ignored silently (not rejected), and they do not stop the wrapper folder from being found
    assert summary(uploads) == {("digits/0/a.png", "0", None), ("digits/1/b.png", "1", None)}
    assert result.rejected == []


def test_symlink_entries_are_ignored() -> None:
    data = zip_entries([symlink("cat/link.png"), ("cat/a.png", PNG)])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.getinfo("cat/link.png").external_attr >> 16 == 0o120777
    uploads, result = read(data)
    assert summary(uploads) == {("cat/a.png", "cat", None)}
    assert result.rejected == []


def test_entries_at_a_wrong_depth_are_rejected() -> None:
    data = zip_bytes(
        [
            ("cat/a.png", noise_png(1)),
            ("dog/b.png", noise_png(2)),
            ("loose.png", noise_png(3)),
            ("cat/sub/deep.png", noise_png(4)),
            ("train/cat/x/y.png", noise_png(5)),
        ]
    )
    uploads, result = read(data)
    assert summary(uploads) == {("cat/a.png", "cat", None), ("dog/b.png", "dog", None)}
    assert rejected_names(result) == {"loose.png", "cat/sub/deep.png", "train/cat/x/y.png"}
    assert all("layout" in entry["reason"] for entry in result.rejected)


def test_loose_files_only_yield_nothing_but_rejections() -> None:
    uploads, result = read(zip_bytes([("a.png", noise_png(1)), ("b.png", noise_png(2))]))
    assert uploads == []
    assert rejected_names(result) == {"a.png", "b.png"}


@pytest.mark.parametrize(
    ("label", "reason"), [(" cat", "spaces"), ("c\x01t", "control"), ("x" * 65, "longer")]
)
def test_unusable_labels_are_rejected(label: str, reason: str) -> None:
    uploads, result = read(zip_entries([(f"{label}/a.png", PNG), ("dog/b.png", noise_png(2))]))
    assert {u.label for u in uploads} == {"dog"}
    assert rejected_names(result) == {f"{label}/a.png"}
    assert reason in result.rejected[0]["reason"]


# ---------------------------------------------------------------- limits and malformed archives


def test_too_many_entries_raise_too_large() -> None:
    data = zip_bytes([(f"cat/{i}.png", noise_png(i)) for i in range(6)])
    assert len(read(data, max_entries=6)[0]) == 6
    with pytest.raises(TooLarge, match="entries"):
        read(data, max_entries=5)


def test_too_large_declared_total_raises_too_large() -> None:
    big = b"\x00" * 50_000  # compresses to almost nothing: the declared size is what counts
    data = zip_bytes([("cat/a.png", big), ("cat/b.png", big)])
    assert len(data) < 5_000
    assert len(read(data, max_uncompressed_bytes=100_000)[0]) == 2
    with pytest.raises(TooLarge, match="expands"):
        read(data, max_uncompressed_bytes=99_999)


def test_member_larger_than_max_image_bytes_is_rejected() -> None:
    small, large = noise_png(1), b"\x89PNG" + b"\x00" * 5_000
    uploads, result = read(
        zip_bytes([("cat/small.png", small), ("cat/large.png", large)]), max_image_bytes=5_000
    )
    assert summary(uploads) == {("cat/small.png", "cat", None)}
    assert rejected_names(result) == {"cat/large.png"}
    assert "5000-byte" in result.rejected[0]["reason"]


def test_member_of_exactly_max_image_bytes_is_accepted() -> None:
    uploads, result = read(zip_bytes([("cat/a.png", b"\x00" * 4096)]), max_image_bytes=4096)
    assert len(uploads) == 1
    assert result.rejected == []


@pytest.mark.parametrize("data", [b"", b"not a zip at all", PNG, b"PK\x03\x04" + b"\x00" * 30])
def test_non_zip_raises_invalid(data: bytes) -> None:
    with pytest.raises(Invalid, match="not a zip"):
        read(data)


def test_empty_zip_raises_invalid() -> None:
    with pytest.raises(Invalid, match="no images"):
        read(zip_bytes([]))


def test_zip_of_only_ignored_entries_raises_invalid() -> None:
    with pytest.raises(Invalid, match="no images"):
        read(zip_entries([("__MACOSX/cat/._a.png", b"x"), (".DS_Store", b"y"), symlink("cat/l.png")]))


def test_corrupt_member_is_rejected_and_the_rest_is_read() -> None:
    payload = b"CORRUPT-ME" * 20
    data = bytearray(
        zip_entries([("cat/bad.png", payload), ("cat/ok.png", PNG)], compression=zipfile.ZIP_STORED)
    )
    offset = data.index(payload)
    data[offset : offset + 7] = b"XXXXXXX"  # the CRC no longer matches
    uploads, result = read(bytes(data))
    assert summary(uploads) == {("cat/ok.png", "cat", None)}
    assert rejected_names(result) == {"cat/bad.png"}
    assert "cannot be extracted" in result.rejected[0]["reason"]


def test_encrypted_member_is_rejected() -> None:
    data = bytearray(zip_entries([("cat/secret.png", PNG), ("cat/ok.png", noise_png(4))]))
    # set the "encrypted" flag bit in the central directory entry of the first member
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x01
    uploads, result = read(bytes(data))
    assert summary(uploads) == {("cat/ok.png", "cat", None)}
    assert rejected_names(result) == {"cat/secret.png"}


@pytest.mark.parametrize("folder", ["Train", "TRAIN"])
def test_a_single_capitalised_split_folder_is_a_split(folder: str) -> None:
    uploads, _ = read(
        zip_bytes([(f"{folder}/cat/a.png", noise_png(1)), (f"{folder}/dog/b.png", noise_png(2))])
    )
    assert {(u.label, u.split) for u in uploads} == {("cat", "train"), ("dog", "train")}


# ---------------------------------------------------------------- zip bombs and archive structure


def with_duplicated_central_records(data: bytes, copies: int) -> bytes:
    """The zip's first central-directory record repeated `copies` times: every copy points at the same
    local entry, so one compressed stream is "extracted" `copies` times (a full-overlap zip bomb)."""
    start = data.index(b"PK\x01\x02")
    end = data.index(b"PK\x05\x06")
    record = data[start:end]
    directory = record * copies
    eocd = bytearray(data[end:])
    struct.pack_into("<HHLL", eocd, 8, copies, copies, len(directory), start)
    return data[:start] + directory + bytes(eocd)


def test_overlapping_entries_refuse_the_archive_before_anything_is_inflated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one = zip_bytes([("cat/a.png", b"\x00" * 1_000_000)])  # ~1 KB compressed
    bomb = with_duplicated_central_records(one, 1000)  # would inflate to 1 GB
    assert len(bomb) < 100_000
    opened: list[str] = []
    original_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile,
        "open",
        lambda self, name, *a, **k: opened.append(str(name)) or original_open(self, name, *a, **k),
    )
    with pytest.raises(Invalid, match="overlap"):
        read(bomb, max_uncompressed_bytes=10**12, max_image_bytes=10**7)
    assert opened == [], "refused from the directory alone, before any member was opened"


def test_entry_data_running_into_the_next_entry_is_an_overlap() -> None:
    data = bytearray(
        zip_entries([("cat/a.png", PNG), ("cat/b.png", noise_png(2))], compression=zipfile.ZIP_STORED)
    )
    # the first entry claims a compressed size that runs into the second entry's local header
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 20, len(PNG) + 40)
    with pytest.raises(Invalid, match="overlap"):
        read(bytes(data))


def test_entry_count_is_walked_from_the_directory_even_when_the_end_record_lies() -> None:
    data = bytearray(zip_bytes([(f"cat/{i}.png", noise_png(i)) for i in range(6)]))
    end = data.index(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 1, 1)  # the end record claims one entry
    with pytest.raises(TooLarge, match="more than 5 entries"):
        read(bytes(data), max_entries=5)


def test_inflated_bytes_are_counted_even_when_declared_sizes_understate_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = zip_bytes([(f"cat/{i}.png", noise_png(i, size=(40, 40))) for i in range(5)])
    total = sum(len(noise_png(i, size=(40, 40))) for i in range(5))
    monkeypatch.setattr(archives, "_declared_total", lambda infos: 0)  # as if every size were a lie
    assert len(read(data, max_uncompressed_bytes=total)[0]) == 5
    with pytest.raises(TooLarge, match="inflates to more than"):
        read(data, max_uncompressed_bytes=total - 1)


def test_a_member_that_declares_less_than_it_holds_is_never_inflated_past_it() -> None:
    data = bytearray(zip_bytes([("cat/a.png", b"\x00" * 100_000), ("cat/b.png", PNG)]))
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, 10)  # declares 10 bytes uncompressed
    uploads, result = read(bytes(data))
    assert summary(uploads) == {("cat/b.png", "cat", None)}
    assert rejected_names(result) == {"cat/a.png"}
    assert "cannot be extracted" in result.rejected[0]["reason"]


@pytest.mark.parametrize("name", ["cat/inner.zip", "cat/more.tar.gz", "cat/x.7z", "cat/y.RAR"])
def test_nested_archives_are_not_opened_and_are_reported_by_name(name: str) -> None:
    inner = zip_bytes([("dog/a.png", noise_png(3))])
    uploads, result = read(zip_bytes([(name, inner), ("cat/a.png", PNG)]))
    assert summary(uploads) == {("cat/a.png", "cat", None)}
    assert result.rejected == [
        {"filename": name, "reason": "nested archive: not opened (upload it on its own)"}
    ]


def test_a_unicode_path_field_names_an_entry_stored_in_another_encoding() -> None:
    """Issue 21, item 4: a tool that writes its own code page (cp866 here) and the Info-ZIP Unicode
    Path field with the true name: the name is taken from the field when its CRC matches the raw name,
    and a stale field (CRC of another name) is ignored."""
    import zlib

    raw = "кот/0.png".encode("cp866")
    stale_raw = "пёс/1.png".encode("cp866")

    def entry(stand_in: str, name: str, crc_of: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        info = zipfile.ZipInfo(stand_in)
        utf8 = name.encode()
        info.extra = struct.pack("<HHBL", 0x7075, 5 + len(utf8), 1, zlib.crc32(crc_of)) + utf8
        return info, noise_png(len(name))

    data = zip_entries(
        [entry("AAA/0.png", "кот/0.png", raw), entry("BBB/1.png", "пёс/1.png", b"not this name")],
        compression=zipfile.ZIP_STORED,
    )
    data = data.replace(b"AAA/0.png", raw).replace(b"BBB/1.png", stale_raw)
    result = UploadResult()
    uploads = list(read_archive(io.BytesIO(data), limits=limits(), result=result))
    assert result.rejected == []
    assert [(u.filename, u.label) for u in uploads] == [
        ("кот/0.png", "кот"),
        (stale_raw.decode("cp437"), stale_raw.decode("cp437").split("/")[0]),  # as the zip says: cp437
    ]
