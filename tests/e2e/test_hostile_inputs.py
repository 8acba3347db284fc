"""The hostile-input battery: every attack against a real `trainserve up` (API keys on, small limits) over
loopback. Each one must get the expected 4xx with a message that says what is wrong; after each, the
service still answers /health and the stored datasets, images, jobs and weights are exactly as before.

Run with `-s` to print the table of attacks and answers (the issue's closing note lists them).
"""

from __future__ import annotations

import io
import json
import pickle
import socket
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, text

from tests.e2e.databases import KINDS, fresh_database
from tests.e2e.processes import trainserve_up
from tests.factories import encode, noise_png, png_declaring, zip_bytes, zip_entries

pytestmark = pytest.mark.e2e

KEY = "battery-key-0123456789"
LIMITS = {
    "TRAINSERVE_MAX_IMAGE_BYTES": "100000",
    "TRAINSERVE_MAX_REQUEST_BYTES": "1000000",
    "TRAINSERVE_MAX_BODY_BYTES": "65536",
    "TRAINSERVE_MAX_FORM_FIELD_BYTES": "4096",
    "TRAINSERVE_MAX_FILES_PER_REQUEST": "20",
    "TRAINSERVE_MAX_ARCHIVE_BYTES": "500000",
    "TRAINSERVE_MAX_ARCHIVE_ENTRIES": "100",
    "TRAINSERVE_MAX_ARCHIVE_UNCOMPRESSED_BYTES": "2000000",
    "TRAINSERVE_MAX_WEIGHTS_BYTES": "200000",
    "TRAINSERVE_MAX_IMAGE_PIXELS": "4000000",
    "TRAINSERVE_MAX_WEIGHTS_EXPANDED_BYTES": "400000",
    "TRAINSERVE_MAX_WEIGHTS_TENSORS": "1000",
    "TRAINSERVE_MAX_WEIGHTS_METADATA_BYTES": "100000",
    "TRAINSERVE_PREDICT_MAX_FILES": "5",
    "TRAINSERVE_MAX_JOB_DEVICES": "4",
    "TRAINSERVE_MAX_JOB_NODES": "2",
    "TRAINSERVE_EVENTS_MAX_STREAMS": "3",
    "TRAINSERVE_EVENTS_MAX_STREAMS_PER_CLIENT": "2",
    "TRAINSERVE_HEADER_READ_TIMEOUT_SECONDS": "3",
    "TRAINSERVE_BODY_READ_TIMEOUT_SECONDS": "3",
}
PAYLOAD_MARKER_NAME = "payload-ran"


@dataclass
class Server:
    client: httpx.Client  # authorised
    port: int
    database_url: str
    folder: Path


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with small limits (SQLite, and PostgreSQL too where one is configured), holding a
    dataset of two classes and a queued job."""
    folder = tmp_path_factory.mktemp("hostile")
    with (
        fresh_database(request.param, folder) as database_url,
        trainserve_up(database_url, folder / "up.log", workers=0, TRAINSERVE_API_KEYS=KEY, **LIMITS) as (
            client,
            _,
        ),
    ):
        client.headers["Authorization"] = f"Bearer {KEY}"
        dataset = client.post("/datasets", json={"name": "target"}).json()["id"]
        for label, seeds in {"cat": (1, 2, 3), "dog": (4, 5, 6)}.items():
            files = [("files", (f"{s}.png", noise_png(s), "image/png")) for s in seeds]
            assert (
                client.post(f"/datasets/{dataset}/images", data={"label": label}, files=files).status_code
                == 201
            )
        assert client.post("/jobs", json={"dataset_id": dataset, "model": "lenet"}).status_code == 201
        yield Server(client, client.base_url.port or 0, database_url, folder)
    log = (folder / "up.log").read_text()
    assert KEY not in log and "wrong-key" not in log, "API keys must never be logged"
    assert "Traceback" not in log, log[-5000:]


def snapshot(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(database_url)
    queries = {
        "dataset": "SELECT id, name FROM dataset ORDER BY id",
        "image": "SELECT id, dataset_id, sha256, label, split, filename FROM image ORDER BY id",
        "training_job": "SELECT id, dataset_id, status, spec FROM training_job ORDER BY id",
        "weights_file": "SELECT id, sha256 FROM weights_file ORDER BY id",
    }
    try:
        with engine.connect() as connection:
            return {
                name: [tuple(row) for row in connection.execute(text(sql))] for name, sql in queries.items()
            }
    finally:
        engine.dispose()


def raw_http(
    port: int, head: str, body: bytes = b"", *, timeout: float = 15
) -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket (for what httpx will not send: lying headers, no body at all)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
        }
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest


@dataclass
class Answer:
    status: int
    detail: str
    headers: dict[str, str]


def answer_of(response: httpx.Response) -> Answer:
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return Answer(
        response.status_code,
        json.dumps(detail) if not isinstance(detail, str) else detail,
        dict(response.headers),
    )


def raw_answer(result: tuple[int, dict[str, str], bytes]) -> Answer:
    status, headers, body = result
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = body.decode("latin-1")
    return Answer(status, detail if isinstance(detail, str) else json.dumps(detail), headers)


# ------------------------------------------------------------------------------------------ payloads


class WritesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def pickle_payload(folder: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "x": WritesAFile(str(folder / PAYLOAD_MARKER_NAME))}, buffer)
    return buffer.getvalue()


def plain_pickle_payload(folder: Path) -> bytes:
    return pickle.dumps({"w": WritesAFile(str(folder / PAYLOAD_MARKER_NAME))}, protocol=2)


def overlapping_zip() -> bytes:
    data = zip_bytes([("cat/a.png", b"\x00" * 1_000_000)])
    start, end = data.index(b"PK\x01\x02"), data.index(b"PK\x05\x06")
    directory = data[start:end] * 90  # 90 MB if inflated; under the 100-entry limit
    eocd = bytearray(data[end:])
    struct.pack_into("<HHLL", eocd, 8, 90, 90, len(directory), start)
    return data[:start] + directory + bytes(eocd)


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("cat/link.png")
    info.external_attr = 0o120777 << 16
    return zip_entries([(info, b"../../../../etc/passwd")])


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"BOUNDARY") -> tuple[str, bytes]:
    """A multipart body from raw (header, content) parts: bytes, so names may be invalid UTF-8."""
    body = b"".join(
        b"--" + boundary + b"\r\n" + header + b"\r\n\r\n" + content + b"\r\n" for header, content in parts
    )
    return f"multipart/form-data; boundary={boundary.decode()}", body + b"--" + boundary + b"--\r\n"


def psd_header() -> bytes:
    # the start of a Photoshop file: Pillow's PSD plugin claims any file that begins like this
    return b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3) + b"\x00" * 64


def eps_bytes() -> bytes:
    return encode(Image.new("RGB", (8, 8), "red"), "EPS")


def torch_file(obj: object, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def deflated_torch_file(obj: object) -> bytes:
    """A torch.save zip re-packed with deflate: torch.load inflates it (a zip bomb of tensors)."""
    source = zipfile.ZipFile(io.BytesIO(torch_file(obj)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    return buffer.getvalue()


def safetensors_file(header: dict[str, Any], data: bytes) -> bytes:
    raw_header = json.dumps(header).encode()
    return struct.pack("<Q", len(raw_header)) + raw_header + data


def dtype_file(dtype: str, shape: list[int], nbytes: int) -> bytes:
    return safetensors_file(
        {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, bytes(nbytes)
    )


def many_tensors_safetensors(count: int) -> bytes:
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)}
    return safetensors_file(header, bytes(count))


def exif_image(fmt: str, seed: int) -> bytes:
    """A valid image carrying an EXIF block Pillow cannot parse (bad TIFF header, or a bad IFD)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    if fmt == "JPEG":
        # orientation 6 plus a GPS IFD pointer at a negative offset: Pillow raised ValueError
        exif = bytes.fromhex(
            "4578696600004d4d002a0000000800020112000300000001000600008825000800000002800000000000000000000000"
        )
        return encode(image, "JPEG", exif=exif, quality=95)
    return encode(image, fmt, exif=b"MM\x00\xd7\x00\x00\x00\x08")


def cp437_zip(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A zip whose names are raw cp437 bytes without the UTF-8 flag (older Windows tools, macOS
    Archive Utility): written under same-length ASCII stand-ins, whose bytes are then swapped in."""
    stand_ins = [
        (f"{chr(65 + i) * (len(name) - 4)}.png".encode(), name) for i, (name, _) in enumerate(entries)
    ]
    data = zip_entries(
        [(stand_in.decode(), content) for (stand_in, _), (_, content) in zip(stand_ins, entries, strict=True)]
    )
    for stand_in, name in stand_ins:
        assert data.count(stand_in) == 2  # its local and central headers
        data = data.replace(stand_in, name)
    return data


# ------------------------------------------------------------------------------------------ attacks

Attack = Callable[[Server], Answer]


def get(path: str, **kw: Any) -> Attack:
    return lambda s: answer_of(s.client.get(path, **kw))


def post(path: str, **kw: Any) -> Attack:
    return lambda s: answer_of(s.client.post(path, **kw))


def unauthorised(method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> Attack:
    def run(s: Server) -> Answer:
        with httpx.Client(base_url=s.client.base_url, timeout=30) as bare:
            return answer_of(bare.request(method, path, headers=headers or {}, **kw))

    return run


def raw(head: str, body: bytes = b"") -> Attack:
    def run(s: Server) -> Answer:
        head_text = head.format(host=f"127.0.0.1:{s.port}", port=s.port, key=KEY)
        return raw_answer(raw_http(s.port, head_text, body))

    return run


def chunked(path: str, size: int, content_type: str, first: bytes = b"") -> Attack:
    """A body sent with Transfer-Encoding: chunked (httpx does so for a generator): no Content-Length."""

    def chunks() -> Iterator[bytes]:
        yield first
        sent = 0
        while sent < size:
            yield b"x" * 65536
            sent += 65536

    return lambda s: answer_of(s.client.post(path, content=chunks(), headers={"Content-Type": content_type}))


def images(files: list[tuple[str, bytes]], label: str = "cat", dataset: int = 1) -> Attack:
    return post(f"/datasets/{dataset}/images", data={"label": label}, files=[("files", f) for f in files])


def archive(data: bytes) -> Attack:
    return post("/datasets/1/archive", files={"file": ("a.zip", data, "application/zip")})


def weights(data: bytes | Callable[[Server], bytes], name: str = "w.pt") -> Attack:
    def run(s: Server) -> Answer:
        payload = data(s) if callable(data) else data
        return answer_of(
            s.client.post("/weights", files={"file": (name, payload, "application/octet-stream")})
        )

    return run


def job(**spec: Any) -> Attack:
    return post("/jobs", json={"dataset_id": 1, "model": "lenet", **spec})


def from_origin(origin: str | None, method: str, path: str, **kw: Any) -> Attack:
    """What a page on another site can make a browser send: a simple request with its Origin."""
    headers = {"Origin": origin} if origin is not None else {"Sec-Fetch-Site": "cross-site"}
    return lambda s: answer_of(s.client.request(method, path, headers=headers, **kw))


def raw_multipart(path: str, parts: list[tuple[bytes, bytes]]) -> Attack:
    content_type, body = multipart(parts)
    return post(path, content=body, headers={"Content-Type": content_type})


def timed(attack: Attack, seconds: float) -> Attack:
    def run(s: Server) -> Answer:
        started = time.perf_counter()
        result = attack(s)
        assert time.perf_counter() - started < seconds, "must be refused quickly"
        return result

    return run


PNG = noise_png(100)
VIEWS_BASE = torch.zeros(1001)  # 1001 views of one storage: one storage entry, 1001 tensors
BIG = b"\x89PNG" + bytes(100_001)
BEARER_UPLOAD = "POST /datasets/1/images HTTP/1.1\nHost: {host}\nAuthorization: Bearer {key}\n"
CASES: list[tuple[str, Attack, int, str]] = [
    # ---- access
    ("no Authorization header", unauthorised("GET", "/datasets"), 401, "missing API key"),
    (
        "wrong key",
        unauthorised("GET", "/jobs", {"Authorization": "Bearer wrong-key"}),
        401,
        "invalid API key",
    ),
    (
        "Basic scheme",
        unauthorised("GET", "/jobs", {"Authorization": "Basic YmF0dGVyeS1rZXk="}),
        401,
        "API key",
    ),
    (
        "prefix of the key",
        unauthorised("GET", "/jobs", {"Authorization": f"Bearer {KEY[:-1]}"}),
        401,
        "invalid",
    ),
    ("key with a suffix", unauthorised("GET", "/jobs", {"Authorization": f"Bearer {KEY}x"}), 401, "invalid"),
    (
        "upload without a key",
        unauthorised("POST", "/datasets/1/images", files={"files": ("a.png", PNG)}),
        401,
        "API key",
    ),
    (
        "50 MB upload without a key: 401 before the body is sent",
        raw(
            "POST /datasets/1/images HTTP/1.1\nHost: {host}\nContent-Type: multipart/form-data; boundary=b\n"
            "Content-Length: 50000000\n"
        ),
        401,
        "API key",
    ),
    (
        "weights upload without a key",
        unauthorised("POST", "/weights", files={"file": ("w.pt", b"x")}),
        401,
        "API key",
    ),
    # ---- sizes
    (
        "Content-Length over the upload limit: 413 before the body is sent",
        raw(BEARER_UPLOAD + "Content-Type: multipart/form-data; boundary=b\nContent-Length: 50000000\n"),
        413,
        "1000000-byte limit",
    ),
    (
        "chunked upload with no Content-Length over the limit",
        chunked(
            "/datasets/1/images",
            3_000_000,
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n',
        ),
        413,
        "1000000-byte limit",
    ),
    (
        "chunked JSON body over the limit",
        chunked("/jobs", 500_000, "application/json"),
        413,
        "65536-byte limit",
    ),
    (
        "JSON body with Content-Length over the limit",
        post("/datasets", content=b"{" + b" " * 70_000 + b"}", headers={"Content-Type": "application/json"}),
        413,
        "65536-byte limit",
    ),
    ("Content-Length not a number", raw(BEARER_UPLOAD + "Content-Length: 12abc\n"), 400, ""),
    (
        "image over the per-file limit (alone)",
        images([("big.png", BIG)]),
        422,
        "big.png: larger than the 100000-byte image limit",
    ),
    (
        "more files than allowed",
        images([(f"{i}.png", noise_png(200 + i)) for i in range(21)]),
        413,
        "too many files in one request; the limit is 20",
    ),
    (
        "1 MB label (form field)",
        post("/datasets/1/images", data={"label": "x" * 10_000}, files=[("files", ("a.png", PNG))]),
        413,
        "form field 'label' is larger than the 4096-byte limit",
    ),
    ("archive over the archive limit", archive(bytes(600_000)), 413, "500000"),
    ("weights over the weights limit", weights(bytes(250_000)), 413, "200000"),
    (
        "predict image over the image limit",
        post("/predict", data={"job_id": "1"}, files={"file": ("a.png", BIG)}),
        413,
        "larger than the 100000-byte limit",
    ),
    (
        "1001 form fields",
        raw_multipart(
            "/datasets/1/images",
            [(f'Content-Disposition: form-data; name="f{i}"'.encode(), b"1") for i in range(1001)],
        ),
        400,
        "Too many fields",
    ),
    # ---- images
    (
        "30000x30000 PNG of a few bytes (decompression bomb)",
        timed(images([("bomb.png", png_declaring(30000, 30000))]), 5),
        422,
        "bomb.png: image too large: over the limit of 4000000 pixels",
    ),
    ("PSD renamed .png", images([("photo.png", psd_header())]), 422, "not a supported image"),
    ("EPS (PostScript) renamed .png", images([("doc.png", eps_bytes())]), 422, "not a supported image"),
    ("truncated PNG", images([("half.png", PNG[: len(PNG) // 2])]), 422, "half.png"),
    ("text file as image", images([("notes.txt", b"hello")]), 422, "notes.txt: not a supported image"),
    (
        "predict with a bomb PNG",
        post("/predict", data={"job_id": "1"}, files={"file": ("b.png", png_declaring(30000, 30000))}),
        409,
        "no checkpoint",
    ),
    # ---- content types
    (
        "POST /datasets as text/plain",
        post("/datasets", content=b'{"name": "x"}', headers={"Content-Type": "text/plain"}),
        422,
        "",
    ),
    ("POST /jobs as a form", post("/jobs", data={"dataset_id": "1", "model": "lenet"}), 422, ""),
    ("images as JSON", post("/datasets/1/images", json={"label": "cat", "files": ["a"]}), 422, ""),
    (
        "multipart without a boundary",
        post("/datasets/1/images", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}),
        400,
        "boundary",
    ),
    (
        "garbage multipart",
        post(
            "/datasets/1/images",
            content=b"\x00\xff" * 100,
            headers={"Content-Type": "multipart/form-data; boundary=zz"},
        ),
        400,
        "Invalid multipart data",
    ),
    ("weights as a form field, not a file", post("/weights", data={"file": "abc"}), 422, ""),
    # ---- names and strings
    (
        "invalid UTF-8 in a JSON body",
        post("/datasets", content=b'{"name": "\xff\xfe"}', headers={"Content-Type": "application/json"}),
        400,
        "error parsing the body",
    ),
    ("NUL in a dataset name", post("/datasets", json={"name": "a\x00b"}), 422, "pattern"),
    ("empty dataset name", post("/datasets", json={"name": ""}), 422, ""),
    ("201-character dataset name", post("/datasets", json={"name": "x" * 201}), 422, ""),
    (
        "invalid UTF-8 file name (not an image)",
        raw_multipart(
            "/datasets/1/images",
            [
                (b'Content-Disposition: form-data; name="label"', b"cat"),
                (b'Content-Disposition: form-data; name="files"; filename="\xff\xfe\x00.png"', b"nope"),
            ],
        ),
        422,
        "not a supported image",
    ),
    (
        "invalid UTF-8 label",
        raw_multipart(
            "/datasets/1/images",
            [
                (b'Content-Disposition: form-data; name="label"', b"\xff\xfe\x01"),
                (b'Content-Disposition: form-data; name="files"; filename="a.png"', PNG),
            ],
        ),
        422,
        "label",
    ),
    ("label with a slash", images([("a.png", PNG)], label="../../etc"), 422, "label contains a slash"),
    ("101-character label", images([("a.png", PNG)], label="x" * 101), 422, "longer than 100"),
    ("SQL in a label (file not an image)", images([("a.txt", b"x")], label="cat' OR '1'='1"), 422, "a.txt"),
    ("SQL in a query parameter", get("/jobs", params={"status": "queued' OR 1=1--"}), 422, ""),
    ("SQL in a path id", get("/datasets/1 OR 1=1"), 422, ""),
    (
        "SQL in the Idempotency-Key of a bad spec",
        post("/jobs", json={"dataset_id": 1}, headers={"Idempotency-Key": "'; DROP TABLE training_job;--"}),
        422,
        "model",
    ),
    (
        "10000-deep nested JSON",
        post("/jobs", content=b"[" * 10_000 + b"]" * 10_000, headers={"Content-Type": "application/json"}),
        400,
        "",
    ),
    # ---- numbers in the spec
    *[
        (f"spec {field}={value!r}", job(**{field: value}), 422, field)
        for field, value in [
            ("epochs", -1),
            ("epochs", 0),
            ("epochs", 10**12),
            ("batch_size", 0),
            ("batch_size", 10**9),
            ("lr", -0.1),
            ("lr", 0),
            ("lr", 1e308),
            ("image_size", 10**100),
            ("image_size", -5),
            ("seed", -1),
            ("seed", 2**64),
            ("milestones", [10**20]),
            ("step_size", 10**30),
            ("val_fraction", 1.5),
            ("dataset_id", 2**40),
            ("dataset_id", -1),
            ("dataset_id", "1; DROP TABLE dataset"),
            ("init_from_job", 0),
            ("init_from_weights", 2**63),
            ("model", "../../etc/passwd"),
            ("model", "lenet'; DROP TABLE training_job;--"),
            ("unknown_option", 1),
        ]
    ],
    (
        "Infinity mixup_alpha",
        post(
            "/jobs",
            content=b'{"dataset_id": 1, "model": "lenet", "mixup_alpha": Infinity}',
            headers={"Content-Type": "application/json"},
        ),
        422,
        "mixup_alpha",
    ),
    (
        "NaN learning rate",
        post(
            "/jobs",
            content=b'{"dataset_id": 1, "model": "lenet", "lr": NaN}',
            headers={"Content-Type": "application/json"},
        ),
        422,
        "lr",
    ),
    # ---- ids that do not exist, path traversal
    ("unknown dataset", get("/datasets/999999"), 404, "dataset 999999 not found"),
    ("unknown job metrics", get("/jobs/999999/metrics"), 404, "job 999999 not found"),
    ("unknown job checkpoint", get("/jobs/999999/checkpoint"), 404, "job 999999 not found"),
    ("unknown weights", get("/weights/999999"), 404, "weights 999999 not found"),
    ("job without checkpoint", get("/jobs/1/checkpoint"), 409, ""),
    ("cancel unknown job", post("/jobs/999999/cancel"), 404, "not found"),
    (
        "images into unknown dataset",
        images([("a.png", PNG)], dataset=999999),
        404,
        "dataset 999999 not found",
    ),
    (
        "predict unknown job",
        post("/predict", data={"job_id": "999999"}, files={"file": ("a.png", PNG)}),
        404,
        "not found",
    ),
    ("job on unknown dataset", job(dataset_id=999999), 404, "dataset 999999 not found"),
    ("id 0", get("/datasets/0"), 422, ""),
    ("id 2**31", get("/jobs/2147483648"), 422, ""),
    ("id 2**64", get("/weights/18446744073709551616"), 422, ""),
    ("id 1.5", get("/jobs/1.5"), 422, ""),
    (
        "encoded traversal in an id",
        raw("GET /datasets/..%2f..%2fetc%2fpasswd HTTP/1.1\nHost: {host}\nAuthorization: Bearer {key}\n"),
        404,
        "",
    ),
    (
        "raw ../ traversal",
        raw("GET /jobs/1/../../../etc/passwd HTTP/1.1\nHost: {host}\nAuthorization: Bearer {key}\n"),
        404,
        "",
    ),
    (
        "traversal under /weights",
        raw(
            "GET /weights/..%2F..%2Fvar%2Ftrainserve.db HTTP/1.1\nHost: {host}\nAuthorization: Bearer {key}\n"
        ),
        404,
        "",
    ),
    ("traversal under /docs", raw("GET /docs/../../etc/passwd HTTP/1.1\nHost: {host}\n"), 404, ""),
    ("DELETE a dataset (no such method)", lambda s: answer_of(s.client.delete("/datasets/1")), 405, ""),
    # ---- archives
    (
        "zip slip only",
        archive(zip_entries([("../evil.png", PNG), ("/abs/x.png", PNG), ("C:/w/x.png", PNG)])),
        422,
        "unsafe path",
    ),
    ("overlapping-entry zip bomb", timed(archive(overlapping_zip()), 5), 422, "overlap"),
    (
        "declared-size zip bomb",
        timed(archive(zip_bytes([("cat/a.png", b"\x00" * 3_000_000)])), 5),
        413,
        "2000000",
    ),
    (
        "too many entries",
        archive(zip_bytes([(f"cat/{i}", b"") for i in range(101)])),
        413,
        "the limit is 100",
    ),
    (
        "nested archive only",
        archive(zip_bytes([("cat/inner.zip", zip_bytes([("dog/a.png", PNG)]))])),
        422,
        "nested archive",
    ),
    ("symlink only", archive(symlink_zip()), 422, "no images"),
    (
        "non-image entries",
        archive(zip_bytes([("cat/readme.txt", b"hi"), ("cat/run.sh", b"rm -rf /")])),
        422,
        "cat/run.sh",
    ),
    ("not a zip", archive(b"PK\x03\x04 not really"), 422, "not a zip"),
    ("empty archive file", archive(b""), 422, "empty"),
    # ---- weights
    (
        "pickle that writes a file (torch.save)",
        weights(lambda s: pickle_payload(s.folder)),
        422,
        "weights_only",
    ),
    (
        "plain pickle that writes a file",
        weights(lambda s: plain_pickle_payload(s.folder)),
        422,
        "weights_only",
    ),
    (
        "safetensors header length 2**63",
        weights(struct.pack("<Q", 2**63) + b"{}", "w.safetensors"),
        422,
        "file:",
    ),
    (
        "safetensors tensor past the end",
        weights(
            struct.pack("<Q", 60) + b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}',
            "w.safetensors",
        ),
        422,
        "safetensors",
    ),
    ("PNG as weights", weights(PNG), 422, "file:"),
    ("empty weights file", weights(b""), 422, "empty"),
    # ---- second round (issue 21): what the first battery missed
    (
        "1.5 KB .pt holding a stride-0 view of 16M floats (64 MB expanded)",
        weights(torch_file({"w": torch.zeros(1).expand(16_000_000)})),
        413,
        "the limit is 400000 (TRAINSERVE_MAX_WEIGHTS_EXPANDED_BYTES)",
    ),
    (
        "legacy-format .pt with a stride-0 view",
        weights(torch_file({"w": torch.zeros(1).expand(16_000_000)}, legacy=True)),
        413,
        "TRAINSERVE_MAX_WEIGHTS_EXPANDED_BYTES",
    ),
    (
        "stride-0 view expanding 100x under the byte limit",
        weights(torch_file({"w": torch.zeros(1).expand(75_000)})),
        413,
        "TRAINSERVE_MAX_WEIGHTS_EXPANSION",
    ),
    (
        "deflated .pt zip: 50 KB inflating to 50 MB of storage",
        weights(deflated_torch_file({"w": torch.zeros(50_000_000, dtype=torch.uint8)})),
        413,
        "TRAINSERVE_MAX_WEIGHTS_EXPANDED_BYTES",
    ),
    (
        "1001 tensors in a safetensors file",
        weights(many_tensors_safetensors(1001), "w.safetensors"),
        413,
        "the limit is 1000 (TRAINSERVE_MAX_WEIGHTS_TENSORS)",
    ),
    (
        "1001 tensors in a .pt file",
        weights(torch_file({f"t{i}": VIEWS_BASE[i : i + 1] for i in range(1001)})),
        413,
        "TRAINSERVE_MAX_WEIGHTS_TENSORS",
    ),
    (
        "110 KB safetensors header",
        weights(
            safetensors_file(
                {
                    "__metadata__": {"pad": "x" * 110_000},
                    "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                bytes(4),
            ),
            "w.safetensors",
        ),
        413,
        "the limit is 100000 (TRAINSERVE_MAX_WEIGHTS_METADATA_BYTES)",
    ),
    *[
        (
            f"safetensors dtype {dtype}",
            weights(dtype_file(dtype, [4], nbytes), "w.safetensors"),
            422,
            f"'{dtype}'",
        )
        for dtype, nbytes in [("F4", 2), ("F6_E2M3", 3), ("F6_E3M2", 3), ("F8_E8M0", 4)]
    ],
    (
        "label with a right-to-left override",
        images([("a.png", PNG)], label="cat\u202egnp.exe"),
        422,
        "U+202E",
    ),
    ("label with a zero-width space", images([("a.png", PNG)], label="ca\u200bt"), 422, "U+200B"),
    ("label with a byte-order mark", images([("a.png", PNG)], label="\ufeffcat"), 422, "U+FEFF"),
    ("label with a bell character", images([("a.png", PNG)], label="c\x07at"), 422, "control character"),
    (
        "6 files to /predict/batch (limit 5): refused as the 6th begins",
        post(
            "/predict/batch",
            data={"job_id": "1"},
            files=[("files", (f"{i}.png", noise_png(300 + i))) for i in range(6)],
        ),
        413,
        "too many files in one request; the limit is 5",
    ),
    (
        "1000 files to /predict/batch",
        timed(
            post(
                "/predict/batch",
                data={"job_id": "1"},
                files=[("files", (f"{i}.png", b"x")) for i in range(1000)],
            ),
            10,
        ),
        413,
        "the limit is 5",
    ),
    ("devices past TRAINSERVE_MAX_JOB_DEVICES", job(devices=5), 422, "TRAINSERVE_MAX_JOB_DEVICES"),
    ("nodes past TRAINSERVE_MAX_JOB_NODES", job(nodes=3), 422, "TRAINSERVE_MAX_JOB_NODES"),
    (
        "Host of another name (DNS rebinding)",
        raw("GET /datasets HTTP/1.1\nHost: attacker.example:{port}\nAuthorization: Bearer {key}\n"),
        400,
        "TRAINSERVE_ALLOWED_HOSTS",
    ),
    (
        "no Host header",
        raw("GET /health HTTP/1.0\nAuthorization: Bearer {key}\n"),
        400,
        "TRAINSERVE_ALLOWED_HOSTS",
    ),
    (
        "cancel a job from another origin",
        from_origin("https://evil.example", "POST", "/jobs/1/cancel"),
        403,
        "cross-origin POST from 'https://evil.example' refused",
    ),
    (
        "upload from another origin",
        from_origin(
            "http://attacker.example:8000",
            "POST",
            "/datasets/1/images",
            data={"label": "cat"},
            files={"files": ("a.png", noise_png(77))},
        ),
        403,
        "cross-origin POST",
    ),
    (
        "cancel from a sandboxed page (Origin: null)",
        from_origin("null", "POST", "/jobs/1/cancel"),
        403,
        "'null'",
    ),
    (
        "cancel marked cross-site, no Origin",
        from_origin(None, "POST", "/jobs/1/cancel"),
        403,
        "another site",
    ),
    (
        "create a dataset from a look-alike origin",
        from_origin("http://127.0.0.1.evil.example", "POST", "/datasets", json={"name": "x"}),
        403,
        "cross-origin",
    ),
]


@pytest.mark.parametrize(("name", "attack", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_refused_and_changes_nothing(
    server: Server, name: str, attack: Attack, status: int, message: str
) -> None:
    before = snapshot(server.database_url)
    answer = attack(server)
    print(f"\n| {name} | {answer.status} | {answer.detail[:160]!r} |")
    assert answer.status == status, (name, answer)
    assert message in answer.detail, (name, answer)
    if status == 401:
        assert answer.headers.get("www-authenticate") == "Bearer"
    health = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert snapshot(server.database_url) == before
    assert not (server.folder / PAYLOAD_MARKER_NAME).exists(), "a pickle payload ran"


def test_no_cors_headers_without_configured_origins(server: Server) -> None:
    response = server.client.get("/datasets", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(
        f"http://127.0.0.1:{server.port}/datasets",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_archive_is_never_extracted_to_disk(server: Server, tmp_path: Path) -> None:
    before = {p for p in server.folder.rglob("*")}
    data = zip_entries([("../../escaped.png", PNG), ("cat/../../../escaped2.png", PNG), ("cat/ok.txt", b"x")])
    assert server.client.post("/datasets/1/archive", files={"file": ("a.zip", data)}).status_code == 422
    assert {p for p in server.folder.rglob("*")} - before <= {
        server.folder / "db.sqlite-wal",
        server.folder / "db.sqlite-shm",
    }
    # where the entry names point from the server's working directory (the test's) and its data folder
    places = {Path.cwd(), *Path.cwd().parents, server.folder, *server.folder.parents}
    assert not [path for place in places for path in place.glob("escaped*.png")]


# ------------------------------------------------------------------- second round (issue 21): accepted


def new_dataset(server: Server, name: str) -> int:
    response = server.client.post("/datasets", json={"name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def stored_images(server: Server, dataset_id: int) -> dict[str, tuple[str, str | None, bytes]]:
    """filename -> (label, split, bytes) of a dataset, read from the database itself."""
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT filename, label, split, data FROM image WHERE dataset_id = :d"),
                {"d": dataset_id},
            )
            return {filename: (label, split, bytes(data)) for filename, label, split, data in rows}
    finally:
        engine.dispose()


def raw_png(seed: int, side: int) -> bytes:
    """An uncompressed PNG of noise: its size is about side * side * 3 bytes, and it decodes."""
    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(array), "PNG", compress_level=0)


def test_many_large_files_in_one_request_are_stored_byte_for_byte(server: Server) -> None:
    """Item 1: each file spans several network chunks, so finished parts are freed while later ones
    are parsed; every file must keep its own byte count (one over the limit sits in the middle)."""
    dataset = new_dataset(server, "many-large")
    files = [(f"{i}.png", raw_png(1000 + i, 180)) for i in range(8)]  # 97,470 bytes each; limit 100,000
    assert all(90_000 < len(data) <= 100_000 for _, data in files)
    oversize = ("over.png", raw_png(2000, 183))  # 100,755 bytes: just over
    sent = [*files[:4], oversize, *files[4:]]
    response = server.client.post(
        f"/datasets/{dataset}/images", data={"label": "big"}, files=[("files", f) for f in sent]
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["added"] == 8 and body["duplicates"] == 0, body
    assert body["rejected"] == [{"filename": "over.png", "reason": "larger than the 100000-byte image limit"}]
    stored = stored_images(server, dataset)
    assert {name: data for name, (_, _, data) in stored.items()} == dict(files)


def test_malformed_exif_is_ignored_and_the_good_files_kept(server: Server) -> None:
    """Item 2: PNG, WebP and JPEG with EXIF blocks Pillow cannot parse, next to good files, on
    /images and /archive: all stored as they are, no 500."""
    bad = [
        ("exif.png", exif_image("PNG", 1)),
        ("exif.webp", exif_image("WEBP", 2)),
        ("exif.jpg", exif_image("JPEG", 3)),
    ]
    good = [("good-1.png", noise_png(901)), ("good-2.png", noise_png(902))]
    dataset = new_dataset(server, "exif")
    response = server.client.post(
        f"/datasets/{dataset}/images", data={"label": "x"}, files=[("files", f) for f in [*bad, *good]]
    )
    assert response.status_code == 201, response.text
    assert (response.json()["added"], response.json()["rejected"]) == (5, [])
    assert {name: data for name, (_, _, data) in stored_images(server, dataset).items()} == dict(
        [*bad, *good]
    )

    dataset = new_dataset(server, "exif-zip")
    zipped = zip_bytes([(f"y/{name}", data) for name, data in [*bad, *good]])
    response = server.client.post(f"/datasets/{dataset}/archive", files={"file": ("e.zip", zipped)})
    assert response.status_code == 201, response.text
    assert (response.json()["added"], response.json()["rejected"]) == (5, [])


def test_zip_with_cp437_names_is_accepted_with_its_names_decoded(server: Server) -> None:
    """Item 4: names not flagged UTF-8 are cp437 (`café` is b'caf\\x82'); they were refused as a zip
    bomb because the overlap check measured their UTF-8 re-encoding."""
    dataset = new_dataset(server, "cp437")
    data = cp437_zip([(b"caf\x82/0.png", noise_png(911)), (b"na\x8bve/1.png", noise_png(912))])
    response = server.client.post(f"/datasets/{dataset}/archive", files={"file": ("old.zip", data)})
    assert response.status_code == 201, response.text
    assert response.json()["added"] == 2
    stored = stored_images(server, dataset)
    assert {name: label for name, (label, _, _) in stored.items()} == {
        "café/0.png": "café",
        "naïve/1.png": "naïve",
    }


def test_conflicting_labels_and_splits_are_reported_by_name(server: Server) -> None:
    """Item 10: the same bytes under a second label, or in both train/ and test/ of a zip, are named as
    conflicts (the stored copy is kept), not silently counted as duplicates."""
    dataset = new_dataset(server, "conflicts")
    png = noise_png(921)
    first = server.client.post(
        f"/datasets/{dataset}/images", data={"label": "cat"}, files={"files": ("a.png", png)}
    )
    assert first.status_code == 201 and first.json()["conflicts"] == []
    second = server.client.post(
        f"/datasets/{dataset}/images", data={"label": "dog"}, files={"files": ("b.png", png)}
    )
    assert second.status_code == 201, second.text
    assert second.json()["duplicates"] == 1
    assert second.json()["conflicts"] == [
        {
            "filename": "b.png",
            "label": "dog",
            "split": None,
            "existing_filename": "a.png",
            "existing_label": "cat",
            "existing_split": None,
        }
    ]
    other = new_dataset(server, "conflicts-zip")
    zipped = zip_bytes(
        [("train/cat/x.png", png), ("test/cat/x.png", png), ("train/dog/y.png", noise_png(922))]
    )
    response = server.client.post(f"/datasets/{other}/archive", files={"file": ("s.zip", zipped)})
    assert response.status_code == 201, response.text
    assert response.json()["conflicts"] == [
        {
            "filename": "test/cat/x.png",
            "label": "cat",
            "split": "test",
            "existing_filename": "train/cat/x.png",
            "existing_label": "cat",
            "existing_split": "train",
        }
    ]


def test_labels_are_nfc_normalised(server: Server) -> None:
    """Item 10: `café` typed as e + combining acute and as é is one class."""
    dataset = new_dataset(server, "nfc")
    for seed, label in [(931, "cafe\u0301"), (932, "caf\u00e9")]:
        response = server.client.post(
            f"/datasets/{dataset}/images", data={"label": label}, files={"files": ("a.png", noise_png(seed))}
        )
        assert response.status_code == 201, response.text
    classes = server.client.get(f"/datasets/{dataset}").json()["classes"]
    assert classes == [{"name": "caf\u00e9", "count": 2}]


def test_an_idempotency_key_reused_with_another_spec_is_422(server: Server) -> None:
    """Item 10: a retry returns the first job; the same key with a different spec is not a retry."""
    headers = {"Idempotency-Key": "battery-key-reuse"}
    spec = {"dataset_id": 1, "model": "lenet", "epochs": 2}
    first = server.client.post("/jobs", json=spec, headers=headers)
    assert first.status_code == 201, first.text
    again = server.client.post("/jobs", json=spec, headers=headers)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    before = snapshot(server.database_url)
    other = server.client.post("/jobs", json={**spec, "epochs": 3}, headers=headers)
    assert other.status_code == 422, other.text
    assert f"already used for job {first.json()['id']} with a different spec" in other.json()["detail"]
    assert snapshot(server.database_url) == before
    assert (
        server.client.post(f"/jobs/{first.json()['id']}/cancel").status_code == 200
    )  # leave the queue as it was


def test_class_names_are_drawn_as_text_in_charts(server: Server) -> None:
    """Item 5: matplotlib parsed `$...$` in class names as mathtext; `$^^$` was a 500."""
    from sqlalchemy.orm import Session

    from app.db.tables import Evaluation, TrainingJob

    job_id = server.client.post("/jobs", json={"dataset_id": 1, "model": "lenet"}).json()["id"]
    names = ["$^^$", "a_{b}$", "\\frac{1}{0}", "$x$"]
    engine = create_engine(server.database_url)
    try:
        with Session(engine) as session, session.begin():
            job = session.get(TrainingJob, job_id)
            assert job is not None
            job.classes = names
            session.add(
                Evaluation(
                    job_id=job_id,
                    split="test",
                    epoch=1,
                    num_samples=8,
                    loss=0.5,
                    accuracy=0.5,
                    top5=1.0,
                    macro_precision=0.5,
                    macro_recall=0.5,
                    macro_f1=0.5,
                    per_class=[
                        {"name": n, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for n in names
                    ],
                    confusion_matrix=[[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]],
                )
            )
    finally:
        engine.dispose()
    for path in (f"/jobs/{job_id}/confusion.png", f"/jobs/{job_id}/metrics.png"):
        response = server.client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.content.startswith(b"\x89PNG")
    assert server.client.post(f"/jobs/{job_id}/cancel").status_code == 200


def open_stream(client: httpx.Client, job_id: int) -> tuple[Any, httpx.Response]:
    context = client.stream("GET", f"/jobs/{job_id}/events", timeout=30)
    response = context.__enter__()
    return context, response


def test_event_streams_are_capped_per_client_and_in_all(server: Server) -> None:
    """Item 8: 2 streams per client address, 3 in all; past them 429 and 503 with Retry-After, and a
    closed stream frees its slot."""
    auth = {"Authorization": f"Bearer {KEY}"}
    base = server.client.base_url
    second_address = httpx.HTTPTransport(local_address="127.0.0.2")
    with (
        httpx.Client(base_url=base, headers=auth, timeout=30) as one,
        httpx.Client(base_url=base, headers=auth, timeout=30, transport=second_address) as two,
    ):
        opened = [open_stream(one, 1), open_stream(one, 1)]
        assert all(response.status_code == 200 for _, response in opened)
        third = one.get("/jobs/1/events")
        assert third.status_code == 429, third.text
        assert (
            third.headers["retry-after"] == "5" and "EVENTS_MAX_STREAMS_PER_CLIENT" in third.json()["detail"]
        )
        other = open_stream(two, 1)
        assert other[1].status_code == 200
        full = two.get("/jobs/1/events")
        assert full.status_code == 503, full.text
        assert (
            full.headers["retry-after"] == "5" and "TRAINSERVE_EVENTS_MAX_STREAMS=3" in full.json()["detail"]
        )
        opened.pop()[0].__exit__(None, None, None)  # one stream closes: its slot comes back
        deadline = time.monotonic() + 15
        while True:
            probe = open_stream(two, 1)
            if probe[1].status_code == 200:
                opened.append(probe)
                break
            probe[0].__exit__(None, None, None)
            assert probe[1].status_code == 503 and time.monotonic() < deadline, "the slot was not released"
            time.sleep(0.2)
        for context, _ in [*opened, other]:
            context.__exit__(None, None, None)


def read_answer(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_slow_clients_are_timed_out(server: Server) -> None:
    """Item 10: a head that trickles in, and a body that stalls, are answered 408 and closed (3 s
    limits here) instead of holding the connection for ever."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        answer = read_answer(sock, 20)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"TRAINSERVE_HEADER_READ_TIMEOUT_SECONDS" in answer
        assert time.monotonic() - started < 15
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        started = time.monotonic()
        head = (
            f"POST /datasets HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"name": ')  # and then nothing
        answer = read_answer(sock, 20)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"TRAINSERVE_BODY_READ_TIMEOUT_SECONDS" in answer
        assert time.monotonic() - started < 15
    assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=30).status_code == 200


def test_same_origin_and_non_browser_requests_still_pass(server: Server) -> None:
    """Item 6: the dashboard's own POSTs (same origin) and clients that send no Origin are served."""
    own = f"http://127.0.0.1:{server.port}"
    for headers in ({"Origin": own}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}, {}):
        response = server.client.post("/datasets", json={"name": "same-origin"}, headers=headers)
        assert response.status_code == 201, (headers, response.text)
    assert server.client.get("/datasets", headers={"Origin": "https://evil.example"}).status_code == 200
    localhost = httpx.get(f"http://localhost:{server.port}/health", timeout=30)
    assert localhost.status_code == 200


def test_docs_pages_load_nothing_from_elsewhere(server: Server) -> None:
    """Item 6: /docs references only this server's own, pinned assets; /redoc (whose page loads its
    logo from a CDN) is off."""
    import re

    assert httpx.get(f"http://127.0.0.1:{server.port}/redoc", timeout=30).status_code == 404
    for page in ("/docs",):
        response = httpx.get(f"http://127.0.0.1:{server.port}{page}", timeout=30)
        assert response.status_code == 200
        assert "default-src 'none'" in response.headers["content-security-policy"]
        references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', response.text)
        references += re.findall(r'url:\s*[\'"]([^\'"]+)', response.text)
        assert references, response.text
        assert all(ref.startswith("/") and not ref.startswith("//") for ref in references), references
        assert "cdn.jsdelivr.net" not in response.text and "fonts.googleapis" not in response.text
        for ref in references:
            if ref.startswith("/docs/assets/"):
                assert httpx.get(f"http://127.0.0.1:{server.port}{ref}", timeout=30).status_code == 200
