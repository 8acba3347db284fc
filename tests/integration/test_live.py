"""Live progress, the events stream, job logs and thumbnails, through the API and the real worker loop."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.db.session import read_scope, session_scope
from app.main import create_app
from app.services import joblogs, queue
from tests.conftest import make_settings
from tests.integration.test_jobs_api import submit, upload_digits
from workers.joblog import JobLogCapture
from workers.loop import serve
from workers.progress import JobReporter, ProgressEstimator

URL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s'"`)]*""", re.IGNORECASE)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """`text/event-stream` body → [{"id", "event", "data"}] (comments and retry lines skipped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":") or line.startswith("retry:"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def stream(client: TestClient, job_id: int, last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    response = client.get(f"/jobs/{job_id}/events", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


@pytest.fixture
def trained(client: TestClient, settings: Settings) -> dict[str, Any]:
    dataset_id = upload_digits(client, per_class=12, classes=3)
    job = submit(client, dataset_id=dataset_id, model="lenet", epochs=3, batch_size=8)
    assert serve(settings, once=True) == 0
    return client.get(f"/jobs/{job['id']}").json()  # type: ignore[no-any-return]


def test_events_of_a_finished_job_replay_everything_then_end(
    client: TestClient, trained: dict[str, Any]
) -> None:
    assert trained["status"] == "succeeded"
    events = stream(client, trained["id"])
    names = [event["event"] for event in events]
    assert names[0] == "status" and names[-1] == "end"
    assert [e["data"]["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert names.count("evaluation") == 1 and names.count("progress") == 1
    assert events[-1]["data"]["status"] == "succeeded"
    logs = [e["data"]["message"] for e in events if e["event"] == "log"]
    assert any("epoch 3/3" in line for line in logs)
    assert "ending succeeded" in logs[-1]  # the log is complete before the final status is visible
    # Ids are cursors whose parts never decrease along the stream.
    cursors = [tuple(int(p) for p in e["id"].split("-")) for e in events]
    for before, after in itertools.pairwise(cursors):
        assert all(b <= a for b, a in zip(before, after, strict=True))


def test_last_event_id_resumes_without_repeats_or_gaps(client: TestClient, trained: dict[str, Any]) -> None:
    everything = stream(client, trained["id"])
    after_epoch_2 = next(e for e in everything if e["event"] == "epoch" and e["data"]["epoch"] == 2)
    resumed = stream(client, trained["id"], last_event_id=after_epoch_2["id"])
    assert [e["data"]["epoch"] for e in resumed if e["event"] == "epoch"] == [3]
    seen = {e["data"]["id"] for e in everything[: everything.index(after_epoch_2) + 1] if e["event"] == "log"}
    rest = [e["data"]["id"] for e in resumed if e["event"] == "log"]
    all_logs = [e["data"]["id"] for e in everything if e["event"] == "log"]
    assert sorted(seen) + rest == all_logs
    # Resuming from the very last id sends the current status and the end, nothing else.
    final = stream(client, trained["id"], last_event_id=everything[-1]["id"])
    assert [e["event"] for e in final] == ["status", "end"]
    # The same cursor is accepted as a query parameter (for EventSource-style clients).
    query = client.get(f"/jobs/{trained['id']}/events", params={"last_event_id": everything[-1]["id"]})
    assert [e["event"] for e in parse_sse(query.text)] == ["status", "end"]


def test_events_bad_cursor_is_422_and_unknown_job_404(client: TestClient, trained: dict[str, Any]) -> None:
    bad = client.get(f"/jobs/{trained['id']}/events", headers={"Last-Event-ID": "banana"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["detail"]
    assert client.get("/jobs/999/events").status_code == 404
    assert client.get("/jobs/999/logs").status_code == 404


def test_logs_are_bounded_and_newest_last(client: TestClient, trained: dict[str, Any]) -> None:
    body = client.get(f"/jobs/{trained['id']}/logs").json()
    messages = [line["message"] for line in body["lines"]]
    assert body["status"] == "succeeded"
    assert "claimed by" in messages[0] and "ending succeeded" in messages[-1]
    assert [line["id"] for line in body["lines"]] == sorted(line["id"] for line in body["lines"])
    last_two = client.get(f"/jobs/{trained['id']}/logs", params={"limit": 2}).json()["lines"]
    assert [line["message"] for line in last_two] == messages[-2:]
    assert client.get(f"/jobs/{trained['id']}/logs", params={"limit": 0}).status_code == 422


def test_progress_of_a_finished_job_has_the_documented_fields(trained: dict[str, Any]) -> None:
    progress = trained["progress"]
    assert progress["phase"] == "succeeded" and progress["epoch"] == 3 and progress["epochs"] == 3
    assert progress["fraction"] == 1.0 and progress["eta_seconds"] == 0.0
    assert progress["batches"] == progress["batch"] > 0
    assert progress["images_per_second"] > 0 and progress["seq"] >= 3
    assert "images" not in progress and "updated_at" in progress


def test_log_capture_batches_lines_and_keeps_only_the_newest(client: TestClient, settings: Settings) -> None:
    dataset_id = upload_digits(client, per_class=3, classes=2)
    job = submit(client, dataset_id=dataset_id, model="lenet")
    with session_scope(settings) as session:
        lease = queue.claim_next_job(session, worker_id="test")
    assert lease is not None
    bounded = settings.model_copy(update={"job_log_max_lines": 5, "job_log_flush_seconds": 3600})
    logger = logging.getLogger("workers.test")
    with JobLogCapture(lease, bounded) as capture:
        for i in range(8):
            logger.info("line %d", i)
        logging.getLogger("sqlalchemy.engine").warning("not ours")
        with read_scope(settings) as session:  # nothing written yet: lines are batched
            assert joblogs.newest_lines(session, job_id=job["id"], limit=100) == []
        logger.info("x" * 10_000)
        capture.flush()
    lines = client.get(f"/jobs/{job['id']}/logs").json()["lines"]
    assert [line["message"] for line in lines[:4]] == ["line 4", "line 5", "line 6", "line 7"]
    assert lines[-1]["message"].endswith("…[truncated]") and len(lines[-1]["message"]) <= 4000
    assert all(line["attempt"] == 1 and line["level"] == "INFO" for line in lines)


def test_reporter_writes_at_most_once_per_interval(client: TestClient, settings: Settings) -> None:
    dataset_id = upload_digits(client, per_class=3, classes=2)
    submit(client, dataset_id=dataset_id, model="lenet")
    with session_scope(settings) as session:
        lease = queue.claim_next_job(session, worker_id="test")
    assert lease is not None
    slow = settings.model_copy(update={"progress_interval_seconds": 3600, "heartbeat_seconds": 3600})
    with JobReporter(lease, slow, threading.Event()) as reporter:
        reporter.update(force=True, phase="training", epoch=1, epochs=2, batch=0, batches=100, fraction=0.0)
        for batch in range(1, 101):  # a hundred batches, no write
            reporter.update(phase="training", batch=batch, fraction=batch / 200, images=batch * 8)
        seq_before = client.get(f"/jobs/{lease.job_id}").json()["progress"]["seq"]
        reporter.update(force=True, phase="validating")
    progress = client.get(f"/jobs/{lease.job_id}").json()["progress"]
    assert seq_before == 1 and progress["seq"] == 2
    assert progress["phase"] == "validating" and progress["batch"] == 100 and progress["fraction"] == 0.5


def test_estimator_gives_eta_and_throughput_from_the_pace() -> None:
    now = [100.0]
    estimator = ProgressEstimator(clock=lambda: now[0])
    progress: dict[str, Any] = {"phase": "training", "epoch": 1, "fraction": 0.0, "images": 0}
    estimator.derive(progress)
    assert "eta_seconds" not in progress
    now[0] = 110.0  # a quarter of the job in 10 s: 30 s to go; 400 images in 10 s
    progress.update(fraction=0.25, images=400)
    estimator.derive(progress)
    assert progress["eta_seconds"] == 30.0 and progress["images_per_second"] == 40.0
    now[0] = 111.0  # a new epoch restarts the image count: no bogus negative rate
    progress.update(epoch=2, fraction=0.5, images=50)
    estimator.derive(progress)
    assert progress["images_per_second"] == 40.0 and progress["eta_seconds"] == 11.0
    now[0] = 112.0  # 140 images/s now: the shown rate moves towards it, smoothed
    progress.update(fraction=0.6, images=190)
    estimator.derive(progress)
    assert progress["images_per_second"] == 70.0


def test_thumbnails_and_image_listing(client: TestClient) -> None:
    dataset_id = upload_digits(client, per_class=4, classes=2)
    images = client.get(f"/datasets/{dataset_id}/images", params={"label": "1", "limit": 3}).json()
    assert len(images) == 3 and {image["label"] for image in images} == {"1"}
    thumb = client.get(f"/datasets/{dataset_id}/images/{images[0]['id']}/thumbnail", params={"size": 32})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)  # 8x8 digits, enlarged
    assert client.get(f"/datasets/{dataset_id}/images/999999/thumbnail").status_code == 404
    assert client.get(f"/datasets/{dataset_id}/images/{images[0]['id']}/thumbnail?size=4").status_code == 422
    assert client.get("/datasets/999/images").status_code == 404


def test_dashboard_is_served_without_outside_assets(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert URL.findall(page.text) == []
    for asset in ("app.js", "charts.js", "style.css", "favicon.svg"):
        response = client.get(f"/ui/static/{asset}")
        assert response.status_code == 200, asset
        assert "default-src 'self'" in response.headers["content-security-policy"]
        # The only URL allowed is SVG's XML namespace name, which is never fetched.
        assert set(URL.findall(response.text)) <= {"http://www.w3.org/2000/svg"}, asset
    assert client.get("/ui/static/nope.js").status_code == 404
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"


def test_with_api_keys_the_page_is_open_but_its_data_is_not(sqlite_url: str) -> None:
    locked = TestClient(create_app(make_settings(sqlite_url, api_keys="k1")))
    assert locked.get("/ui").status_code == 200  # static files, no data
    assert locked.get("/ui/static/app.js").status_code == 200
    for path in ("/jobs/1/events", "/jobs/1/logs", "/datasets/1/images", "/datasets/1/images/1/thumbnail"):
        assert locked.get(path).status_code == 401, path
    assert locked.get("/jobs/1/events", headers={"Authorization": "Bearer k1"}).status_code == 404
