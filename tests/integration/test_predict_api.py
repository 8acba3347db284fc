"""POST /predict and /predict/batch over a real SQLite (and PostgreSQL) database: answers equal the model's
own, the checkpoint that answered is named, bad files are clear 4xx, the cache follows new checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.main import create_app
from app.services import predictions
from models.predictor import Predictor
from models.preprocessing import decode_image
from tests.checkpoints import CLASSES, ServedJob, claim_with_best, queued_job, store_best
from tests.conftest import make_settings
from tests.factories import encode, image_bytes, noise_png, png_declaring


def post_predict(client: TestClient, job_id: int, data: bytes, **form: object):  # type: ignore[no-untyped-def]
    return client.post(
        "/predict", data={"job_id": str(job_id), **form}, files={"file": ("x.png", data, "image/png")}
    )


def expected_scores(weights: bytes, data: bytes) -> dict[str, float]:
    return Predictor(weights).predict(decode_image(data))


@pytest.fixture
def served(client: TestClient, settings: Settings) -> ServedJob:
    queued_job(client)
    return claim_with_best(settings, epoch=3, seed=1)


def test_predict_answers_with_the_models_own_scores_and_names_the_checkpoint(
    client: TestClient, served: ServedJob
) -> None:
    data = noise_png(5, size=(40, 30), mode="RGB")
    body = post_predict(client, served.job_id, data).json()
    assert body["job_id"] == served.job_id
    assert body["epoch"] == 3
    assert list(body["scores"]) == CLASSES
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    expected = expected_scores(served.weights, data)
    assert body["scores"] == pytest.approx(expected, abs=1e-6)
    assert body["label"] == max(expected, key=expected.__getitem__)
    assert body["score"] == pytest.approx(max(expected.values()), abs=1e-6)
    assert "top" not in body


def test_top_k_lists_the_best_classes_in_order(client: TestClient, served: ServedJob) -> None:
    body = post_predict(client, served.job_id, noise_png(6), top_k="3").json()
    ranked = sorted(body["scores"].items(), key=lambda kv: kv[1], reverse=True)
    assert [(t["label"], t["score"]) for t in body["top"]] == ranked[:3]
    assert body["top"][0]["label"] == body["label"]
    # More than the class count gives every class, never an error.
    assert len(post_predict(client, served.job_id, noise_png(6), top_k="50").json()["top"]) == len(CLASSES)
    for bad in ["0", "-1", "many"]:
        response = post_predict(client, served.job_id, noise_png(6), top_k=bad)
        assert response.status_code == 422, bad
        assert "top_k" in response.text


BAD_FILES = {
    "not an image": (b"hello, world", "not a supported image"),
    "empty": (b"", "empty file"),
    "truncated": (encode(decode_image(noise_png(3, size=(64, 64))), "PNG")[:200], "truncated"),
    "decompression bomb": (png_declaring(30000, 30000), "image too large"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_a_clear_422(client: TestClient, served: ServedJob, case: str) -> None:
    data, reason = BAD_FILES[case]
    response = post_predict(client, served.job_id, data)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]


def test_missing_fields_and_unknown_jobs_are_4xx(client: TestClient, served: ServedJob) -> None:
    no_job = client.post("/predict", files={"file": ("x.png", noise_png(1), "image/png")})
    assert no_job.status_code == 422 and "job_id" in no_job.text
    no_file = client.post("/predict", data={"job_id": str(served.job_id)})
    assert no_file.status_code == 422 and "file" in no_file.text
    assert post_predict(client, 999, noise_png(1)).status_code == 404
    assert (
        client.post("/predict", data={"job_id": "x"}, files={"file": ("x.png", b"1", "x")}).status_code == 422
    )


def test_a_file_over_the_size_limit_is_413(database_url: str) -> None:
    settings = make_settings(database_url, max_image_bytes=1000)
    with TestClient(create_app(settings)) as client:
        job = (queued_job(client), claim_with_best(settings))[1]
        response = post_predict(client, job.job_id, noise_png(1, size=(64, 64)))
        assert response.status_code == 413
        assert "1000-byte" in response.json()["detail"]


def test_bad_requests_do_not_disturb_good_ones_in_flight(client: TestClient, served: ServedJob) -> None:
    goods = [noise_png(seed, size=(28, 28)) for seed in range(24)]
    bads = [data for data, _ in BAD_FILES.values()] * 3

    def one(item: tuple[bool, bytes]) -> tuple[bool, bytes, int, dict]:  # type: ignore[type-arg]
        good, data = item
        response = post_predict(client, served.job_id, data)
        return good, data, response.status_code, response.json()

    mixed = [(True, d) for d in goods] + [(False, d) for d in bads]
    mixed = mixed[::2] + mixed[1::2]
    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(one, mixed))
    for good, data, status, body in outcomes:
        if good:
            assert status == 200, body
            assert body["scores"] == pytest.approx(expected_scores(served.weights, data), abs=1e-6)
        else:
            assert status == 422, body


def test_batch_returns_one_result_per_file_in_order(client: TestClient, served: ServedJob) -> None:
    files = [noise_png(1), b"not an image", image_bytes((50, 20)), b"", noise_png(2, mode="RGB")]
    response = client.post(
        "/predict/batch",
        data={"job_id": str(served.job_id), "top_k": "2"},
        files=[("files", (f"f{i}.png", data, "image/png")) for i, data in enumerate(files)],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["job_id"], body["epoch"]) == (served.job_id, 3)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["filename"] for r in results] == [f"f{i}.png" for i in range(5)]
    assert [r["status_code"] for r in results] == [200, 422, 200, 422, 200]
    assert "not a supported image" in results[1]["error"] and "empty file" in results[3]["error"]
    for index in (0, 2, 4):
        prediction = results[index]["prediction"]
        assert prediction["scores"] == pytest.approx(expected_scores(served.weights, files[index]), abs=1e-6)
        assert len(prediction["top"]) == 2 and prediction["epoch"] == 3
        assert "error" not in results[index]


def test_batch_limits(database_url: str) -> None:
    settings = make_settings(database_url, predict_max_files=3, max_image_bytes=1000)
    with TestClient(create_app(settings)) as client:
        job = (queued_job(client), claim_with_best(settings))[1]
        big = noise_png(1, size=(64, 64))
        response = client.post(
            "/predict/batch",
            data={"job_id": str(job.job_id)},
            files=[
                ("files", ("small.png", noise_png(2), "image/png")),
                ("files", ("big.png", big, "image/png")),
            ],
        )
        assert [r["status_code"] for r in response.json()["results"]] == [200, 413]
        too_many = client.post(
            "/predict/batch",
            data={"job_id": str(job.job_id)},
            files=[("files", (f"{i}.png", noise_png(i), "image/png")) for i in range(4)],
        )
        # Refused by the bounded parser as the fourth part begins, like an upload with too many files.
        assert too_many.status_code == 413
        assert "too many files in one request; the limit is 3" in too_many.json()["detail"]
        no_files = client.post("/predict/batch", data={"job_id": str(job.job_id)})
        assert no_files.status_code == 422


@pytest.fixture
def fresh_client(database_url: str) -> Iterator[tuple[TestClient, Settings]]:
    """Refresh on every request: the cache must notice a new best checkpoint at once."""
    settings = make_settings(database_url, predict_refresh_seconds=0)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_a_newer_best_checkpoint_replaces_the_cached_model(fresh_client: tuple[TestClient, Settings]) -> None:
    client, settings = fresh_client
    queued_job(client)
    job = claim_with_best(settings, epoch=1, seed=1)
    data = noise_png(9, size=(28, 28))
    first = post_predict(client, job.job_id, data).json()
    cache = client.app.state.predictors  # type: ignore[attr-defined]
    model = cache.peek(job.job_id)
    again = post_predict(client, job.job_id, data).json()
    assert cache.peek(job.job_id) is model, "an unchanged checkpoint is checked, not reloaded"
    assert again == first

    new_weights = store_best(settings, job.lease, epoch=4, seed=2)
    newer = post_predict(client, job.job_id, data).json()
    assert newer["epoch"] == 4
    assert newer["scores"] == pytest.approx(expected_scores(new_weights, data), abs=1e-6)
    assert newer["scores"] != pytest.approx(first["scores"], abs=1e-6)


def test_within_the_refresh_interval_no_database_check_is_made(database_url: str) -> None:
    settings = make_settings(database_url, predict_refresh_seconds=3600)
    with TestClient(create_app(settings)) as client:
        queued_job(client)
        job = claim_with_best(settings, epoch=1, seed=1)
        assert post_predict(client, job.job_id, noise_png(1)).json()["epoch"] == 1
        store_best(settings, job.lease, epoch=2, seed=2)
        # Bounded staleness: the cached model answers until the interval has passed.
        assert post_predict(client, job.job_id, noise_png(1)).json()["epoch"] == 1


def test_least_recently_used_models_are_evicted_by_count_and_by_memory(database_url: str) -> None:
    settings = make_settings(database_url, predict_cache_size=2)
    with TestClient(create_app(settings)) as client:
        jobs = []
        for seed in range(3):
            queued_job(client)
            jobs.append(claim_with_best(settings, seed=seed).job_id)
        cache = client.app.state.predictors  # type: ignore[attr-defined]
        for job_id in [jobs[0], jobs[1], jobs[0], jobs[2]]:
            assert post_predict(client, job_id, noise_png(1)).status_code == 200
        assert cache.cached_jobs() == [jobs[0], jobs[2]]  # jobs[1] was the least recently used
        size = cache.peek(jobs[2]).size_bytes

    settings = make_settings(database_url, predict_cache_max_bytes=size + size // 2)
    with TestClient(create_app(settings)) as client:
        cache = client.app.state.predictors  # type: ignore[attr-defined]
        for job_id in jobs:
            assert post_predict(client, job_id, noise_png(1)).status_code == 200
        assert cache.cached_jobs() == [jobs[2]]  # two would not fit


def test_predict_batch_needs_the_api_key(database_url: str) -> None:
    settings = make_settings(database_url, api_keys=["k1"])
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/predict/batch", data={"job_id": "1"}, files=[("files", ("a.png", noise_png(1), "image/png"))]
        )
        assert response.status_code == 401


def test_a_cached_model_keeps_answering_when_the_freshness_check_fails(
    fresh_client: tuple[TestClient, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, settings = fresh_client
    queued_job(client)
    job = claim_with_best(settings, epoch=2, seed=1)
    first = post_predict(client, job.job_id, noise_png(4)).json()

    def database_down(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("SELECT ...", {}, Exception("connection refused"))

    monkeypatch.setattr(predictions, "checkpoint_version", database_down)
    again = post_predict(client, job.job_id, noise_png(4))
    assert again.status_code == 200 and again.json() == first


class DoneExecutor(Executor):
    """Answers every submit with an already finished future holding `result`."""

    def __init__(self, result: object) -> None:
        self.result = result

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        future: Future[object] = Future()
        future.set_result(self.result)
        return future


@pytest.mark.timeout(60, method="thread")  # a regression hangs the event loop thread
def test_a_load_finished_before_its_callback_is_registered_does_not_hang(
    fresh_client: tuple[TestClient, Settings],
) -> None:
    """Regression: the done-callback of an already finished check ran under the cache lock it takes."""
    client, settings = fresh_client
    queued_job(client)
    job = claim_with_best(settings)
    assert post_predict(client, job.job_id, noise_png(1)).status_code == 200
    cache = client.app.state.predictors  # type: ignore[attr-defined]
    cache._loader = DoneExecutor(cache.peek(job.job_id))
    assert post_predict(client, job.job_id, noise_png(1)).status_code == 200
