"""Metrics as CSV and charts as PNG: the chart functions alone, and the routes over a trained job."""

from __future__ import annotations

import csv
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.schemas.jobs import EpochMetricRead
from app.services import charts
from tests.integration.test_jobs_api import submit, upload_digits
from workers.loop import serve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def open_png(data: bytes, *, min_side: int = 200) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated file fails here
    assert image.format == "PNG"
    assert min(image.size) >= min_side, image.size
    return image


def row(epoch: int, **overrides: object) -> EpochMetricRead:
    values: dict[str, object] = {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_acc": 0.5 + 0.04 * epoch,
        "val_loss": 1.1 / epoch,
        "val_acc": 0.45 + 0.04 * epoch,
        "val_top5": None,
        "val_precision": 0.5,
        "val_recall": 0.5,
        "val_f1": 0.5,
        "lr": 1e-3 * 0.5**epoch,
        "seconds": 1.5,
        "images_per_second": 120.0,
        "data_seconds": None,
    }
    values.update(overrides)
    return EpochMetricRead.model_validate(values)


# The chart functions alone.


def test_csv_has_every_field_and_empty_cells_for_none() -> None:
    text = charts.metrics_csv([row(1), row(2, val_loss=None)])
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == list(EpochMetricRead.model_fields)
    assert len(lines) == 3
    record = dict(zip(lines[0], lines[2], strict=True))
    assert record["epoch"] == "2" and record["val_loss"] == "" and record["data_seconds"] == ""
    assert float(record["train_loss"]) == 0.5
    assert charts.metrics_csv([]).splitlines() == [",".join(EpochMetricRead.model_fields)]


def test_metrics_png_with_one_epoch() -> None:
    open_png(charts.metrics_png([row(1)], title="one epoch", best_epoch=1))


def test_metrics_png_with_missing_and_non_finite_values() -> None:
    rows = [
        row(1, val_loss=None, val_acc=None),
        row(2, val_loss=None, val_acc=0.6, train_loss=float("inf")),
        row(3, val_loss=None, val_acc=None, train_loss=float("nan")),
    ]
    open_png(charts.metrics_png(rows, title="gaps"))
    no_val = [row(e, val_loss=None, val_acc=None, val_precision=None, val_f1=None) for e in range(1, 4)]
    open_png(charts.metrics_png(no_val, title="no validation"))


@pytest.mark.parametrize("lrs", [[0.1, 0.1, 0.1], [1.0, 1e-3, 1e-6], [0.0, 1e-3, 1e-4]])
def test_metrics_png_with_constant_decaying_and_zero_lr(lrs: list[float]) -> None:
    rows = [row(epoch, lr=lr) for epoch, lr in enumerate(lrs, start=1)]
    open_png(charts.metrics_png(rows, title="lr"))


def test_metrics_png_with_no_rows_is_a_placeholder() -> None:
    open_png(charts.metrics_png([], title="job 1"))


def test_confusion_png_small_large_and_empty() -> None:
    small = open_png(charts.confusion_png(["cat", "dog"], [[3, 1], [0, 4]], title="two"))
    many = [[(i * 7 + j * 3) % 11 for j in range(50)] for i in range(50)]
    large = open_png(charts.confusion_png([f"class {i}" for i in range(50)], many, title="fifty"))
    assert large.size[0] > small.size[0]
    open_png(charts.confusion_png([], [], title="none"))
    open_png(charts.confusion_png(["only names"], [[1, 0], [0, 1]], title="names missing"))
    with pytest.raises(ValueError, match="square"):
        charts.confusion_png(["a", "b"], [[1, 2], [3]], title="ragged")


# Through the API.


@pytest.fixture
def trained(client: TestClient, settings: Settings) -> dict:  # type: ignore[type-arg]
    dataset_id = upload_digits(client, per_class=10, classes=2)
    job = submit(client, dataset_id=dataset_id, model="simple_cnn", epochs=2, batch_size=8)
    serve(settings, once=True)
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    return done  # type: ignore[no-any-return]


def test_csv_matches_the_json_metrics(client: TestClient, trained: dict) -> None:  # type: ignore[type-arg]
    job_id = trained["id"]
    epochs = client.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert client.get(f"/jobs/{job_id}/metrics", params={"format": "json"}).json()["epochs"] == epochs

    response = client.get(f"/jobs/{job_id}/metrics", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"] == f'attachment; filename="job-{job_id}-metrics.csv"'
    lines = list(csv.DictReader(io.StringIO(response.text)))
    assert len(lines) == len(epochs) == 2
    for line, expected in zip(lines, epochs, strict=True):
        assert list(line) == list(expected)
        for name, value in expected.items():
            if value is None:
                assert line[name] == "", name
            else:
                assert float(line[name]) == pytest.approx(value, rel=1e-12), name

    assert client.get(f"/jobs/{job_id}/metrics", params={"format": "xml"}).status_code == 422


def test_metrics_and_confusion_charts_of_a_trained_job(client: TestClient, trained: dict) -> None:  # type: ignore[type-arg]
    job_id = trained["id"]
    response = client.get(f"/jobs/{job_id}/metrics.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    open_png(response.content)

    response = client.get(f"/jobs/{job_id}/confusion.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    open_png(response.content)


def test_charts_of_a_queued_job(client: TestClient) -> None:
    dataset_id = upload_digits(client, per_class=3, classes=2)
    job = submit(client, dataset_id=dataset_id, model="simple_cnn")
    response = client.get(f"/jobs/{job['id']}/metrics.png")
    assert response.status_code == 200
    open_png(response.content)
    csv_text = client.get(f"/jobs/{job['id']}/metrics", params={"format": "csv"}).text
    assert csv_text.splitlines() == [",".join(EpochMetricRead.model_fields)]

    response = client.get(f"/jobs/{job['id']}/confusion.png")
    assert response.status_code == 409
    assert "no test evaluation yet" in response.json()["detail"]


def test_charts_of_an_unknown_job_are_404(client: TestClient) -> None:
    for path in ["/jobs/77/metrics.png", "/jobs/77/confusion.png", "/jobs/77/metrics?format=csv"]:
        assert client.get(path).status_code == 404, path
    assert client.get("/jobs/abc/metrics.png").status_code == 422


def test_openapi_documents_the_chart_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    metrics = paths["/jobs/{job_id}/metrics"]["get"]
    content = metrics["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/MetricsRead"}
    assert "text/csv" in content
    assert [p["name"] for p in metrics["parameters"]] == ["job_id", "format"]
    for path in ["/jobs/{job_id}/metrics.png", "/jobs/{job_id}/confusion.png"]:
        assert "image/png" in paths[path]["get"]["responses"]["200"]["content"], path
