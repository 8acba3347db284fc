"""Costly requests against a real `trainserve up` (SQLite, and PostgreSQL where configured), with limits
in the megabytes: many large files in one upload, an oversize file in a prediction batch, and
concurrent thumbnails of one very large image. What they cost is read from the API process itself
(bytes it wrote, its resident memory), never from timings.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.e2e.databases import KINDS, fresh_database
from tests.e2e.processes import trainserve_up
from tests.factories import encode, noise_png

pytestmark = pytest.mark.e2e

IMAGE_LIMIT = 2_000_000
SETTINGS = {
    "TRAINSERVE_MAX_IMAGE_BYTES": str(IMAGE_LIMIT),
    "TRAINSERVE_MAX_REQUEST_BYTES": "64000000",
    "TRAINSERVE_MAX_FILES_PER_REQUEST": "40",
    "TRAINSERVE_MAX_IMAGE_PIXELS": "100000000",
    "TRAINSERVE_THUMBNAIL_CONCURRENCY": "2",
}


@dataclass
class Server:
    client: httpx.Client
    database_url: str
    api: psutil.Process  # the API process `up` started


def api_process(up: int) -> psutil.Process:
    children = psutil.Process(up).children()
    (api,) = [child for child in children if "api" in child.cmdline()]
    return api


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("costly")
    with (
        fresh_database(request.param, folder) as database_url,
        trainserve_up(database_url, folder / "up.log", workers=0, **SETTINGS) as (client, process),
    ):
        yield Server(client, database_url, api_process(process.pid))
    assert "Traceback" not in (folder / "up.log").read_text()


def raw_png(seed: int, side: int) -> bytes:
    """An uncompressed PNG of noise, about side * side * 3 bytes, that decodes."""
    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(array), "PNG", compress_level=0)


def new_dataset(server: Server, name: str) -> int:
    response = server.client.post("/datasets", json={"name": name})
    assert response.status_code == 201
    return int(response.json()["id"])


def test_twenty_files_of_almost_the_limit_are_stored_byte_for_byte(server: Server) -> None:
    """Issue 21, item 1: the per-file byte count was keyed by id(part); once earlier parts were freed a
    later file inherited their count, and valid files came back cut short or "empty"."""
    files = {f"{i:02d}.png": raw_png(i, 800) for i in range(20)}  # 1,921,501 bytes each
    assert all(len(data) < IMAGE_LIMIT for data in files.values())
    dataset = new_dataset(server, "large-files")
    response = server.client.post(
        f"/datasets/{dataset}/images",
        data={"label": "noise"},
        files=[("files", item) for item in files.items()],
    )
    assert response.status_code == 201, response.text
    assert (response.json()["added"], response.json()["rejected"]) == (20, [])
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT filename, data FROM image WHERE dataset_id = :d"), {"d": dataset}
            )
            stored = {filename: bytes(data) for filename, data in rows}
    finally:
        engine.dispose()
    assert stored.keys() == files.keys()
    assert [name for name in files if stored[name] != files[name]] == []


def written_bytes(process: psutil.Process) -> int:
    return int(process.io_counters().write_chars)


def test_an_oversize_file_in_a_prediction_batch_is_not_spooled(server: Server) -> None:
    """Issue 21, item 7: /predict/batch wrote a whole 40 MB file to a temporary file before refusing
    it; on the bounded parser no more than its limit is kept."""
    dataset = new_dataset(server, "predict-batch")
    for label, seed in (("a", 1), ("b", 2)):
        files = {"files": (f"{label}.png", noise_png(seed))}
        assert (
            server.client.post(f"/datasets/{dataset}/images", data={"label": label}, files=files).status_code
            == 201
        )
    job_id = server.client.post("/jobs", json={"dataset_id": dataset, "model": "lenet"}).json()["id"]
    huge = b"\x89PNG" + bytes(40_000_000)
    before = written_bytes(server.api)
    response = server.client.post(
        "/predict/batch",
        data={"job_id": str(job_id)},
        files=[("files", ("small.png", noise_png(3))), ("files", ("huge.png", huge))],
    )
    written = written_bytes(server.api) - before
    assert response.status_code == 409, response.text  # the job has no checkpoint: refused after parsing
    assert written < 4 * IMAGE_LIMIT, f"the API wrote {written} bytes for a 40 MB file it refuses"
    server.client.post(f"/jobs/{job_id}/cancel")


def gradient_jpeg(side: int) -> bytes:
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = ramp[None, :, None] * np.array([1.0, 0.5, 0.2]) + ramp[:, None, None] * np.array([0.0, 0.5, 0.8])
    return encode(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), "JPEG", quality=80)


def peak_rss_while(process: psutil.Process, work: threading.Thread) -> int:
    peak = int(process.memory_info().rss)
    work.start()
    while work.is_alive():
        peak = max(peak, int(process.memory_info().rss))
        time.sleep(0.01)
    return peak


def test_concurrent_thumbnails_of_a_huge_jpeg_stay_small(server: Server) -> None:
    """Issue 21, item 8: 8 thumbnails of one 8000x8000 JPEG at once decoded it 8 times in full (192 MB
    each); now a JPEG is decoded at 1/8 scale, and at most 2 thumbnails decode at once."""
    data = gradient_jpeg(8000)
    assert len(data) < IMAGE_LIMIT
    dataset = new_dataset(server, "huge-jpeg")
    upload = server.client.post(
        f"/datasets/{dataset}/images", data={"label": "g"}, files={"files": ("g.jpg", data)}
    )
    assert upload.status_code == 201, upload.text
    image_id = server.client.get(f"/datasets/{dataset}/images").json()[0]["id"]
    url = f"/datasets/{dataset}/images/{image_id}/thumbnail?size=256"
    assert server.client.get(url).status_code == 200  # warm: the first request loads what it imports
    statuses: list[int] = []

    def eight_at_once() -> None:
        def one() -> None:
            statuses.append(httpx.get(f"{server.client.base_url}{url}", timeout=120).status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    baseline = server.api.memory_info().rss
    peak = peak_rss_while(server.api, threading.Thread(target=eight_at_once))
    assert statuses == [200] * 8
    grown = (peak - baseline) / 2**20
    assert grown < 150, f"the API grew by {grown:.0f} MiB for 8 thumbnails (one full decode is 183 MiB)"


def test_a_thumbnail_is_the_image_scaled_not_cropped(server: Server) -> None:
    """The reduced decode draws the same picture: the corners of the gradient keep their colours."""
    dataset = new_dataset(server, "thumb-content")
    data = gradient_jpeg(4000)
    assert (
        server.client.post(
            f"/datasets/{dataset}/images", data={"label": "g"}, files={"files": ("g.jpg", data)}
        ).status_code
        == 201
    )
    image_id = server.client.get(f"/datasets/{dataset}/images").json()[0]["id"]
    png = server.client.get(f"/datasets/{dataset}/images/{image_id}/thumbnail?size=64").content
    thumb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    assert thumb.shape == (64, 64, 3)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64)), dtype=np.int32)
    assert np.abs(thumb - full).mean() < 6


def test_devices_beyond_this_machine_are_refused_at_submit(server: Server, tmp_path: Path) -> None:
    """Issue 21, item 8: with no worker registered and no setting, `devices` is bounded by this
    machine's CPU count (64 on a 2-core host started 64 processes)."""
    import os

    dataset = new_dataset(server, "devices")
    for label, seed in (("a", 11), ("b", 12)):
        files = {"files": (f"{label}.png", noise_png(seed))}
        assert (
            server.client.post(f"/datasets/{dataset}/images", data={"label": label}, files=files).status_code
            == 201
        )
    cores = os.cpu_count() or 1
    if cores >= 64:
        pytest.skip("this machine has 64 cores or more: devices=64 fits it")
    response = server.client.post("/jobs", json={"dataset_id": dataset, "model": "lenet", "devices": 64})
    assert response.status_code == 422, response.text
    assert f"at most {cores} can be served (this machine's CPUs)" in response.json()["detail"]
    fits = server.client.post("/jobs", json={"dataset_id": dataset, "model": "lenet", "devices": 1})
    assert fits.status_code == 201
    server.client.post(f"/jobs/{fits.json()['id']}/cancel")


def read_events_until_end(response: httpx.Response) -> list[str]:
    names = []
    for line in response.iter_lines():
        if line.startswith("event: "):
            names.append(line.removeprefix("event: "))
            if names[-1] == "end":
                break
    return names


def test_many_open_streams_each_see_their_job_change(server: Server) -> None:
    """Issue 21, item 8: open streams sleep until one shared check finds their job changed; a change
    still reaches every stream of that job, and only those."""
    dataset = new_dataset(server, "streams")
    for label, seed in (("a", 21), ("b", 22)):
        files = {"files": (f"{label}.png", noise_png(seed))}
        assert (
            server.client.post(f"/datasets/{dataset}/images", data={"label": label}, files=files).status_code
            == 201
        )
    watched, other = (
        server.client.post("/jobs", json={"dataset_id": dataset, "model": "lenet"}).json()["id"]
        for _ in range(2)
    )
    results: list[list[str]] = []

    def follow() -> None:
        with httpx.stream("GET", f"{server.client.base_url}/jobs/{watched}/events", timeout=60) as response:
            assert response.status_code == 200
            results.append(read_events_until_end(response))

    followers = [threading.Thread(target=follow) for _ in range(12)]
    with httpx.stream("GET", f"{server.client.base_url}/jobs/{other}/events", timeout=60) as bystander:
        assert bystander.status_code == 200
        for thread in followers:
            thread.start()
        time.sleep(2)  # every follower is connected and asleep
        assert server.client.post(f"/jobs/{watched}/cancel").status_code == 200
        for thread in followers:
            thread.join(timeout=30)
        assert results == [["status", "status", "end"]] * 12  # queued, then cancelled, then the end
    assert server.client.get(f"/jobs/{other}").json()["status"] == "queued"
    server.client.post(f"/jobs/{other}/cancel")
