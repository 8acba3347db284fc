"""Datasets and uploads through the HTTP API, over a real SQLite file."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.core.config import Settings
from tests.factories import digits, image_bytes, noise_png, zip_bytes


def create_dataset(client: TestClient, name: str = "pets") -> int:
    response = client.post("/datasets", json={"name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_create_and_read_dataset(client: TestClient) -> None:
    dataset_id = create_dataset(client, "digits")
    body = client.get(f"/datasets/{dataset_id}").json()
    assert body["name"] == "digits"
    assert body["num_images"] == 0
    assert body["classes"] == []
    assert [d["id"] for d in client.get("/datasets").json()] == [dataset_id]


def test_upload_several_files_in_all_formats_and_modes(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    files = [
        ("files", ("a.png", image_bytes((30, 20), mode="L", color=10), "image/png")),
        ("files", ("b.jpg", image_bytes((640, 480), fmt="JPEG"), "image/jpeg")),
        ("files", ("c.bmp", image_bytes((7, 9), color=(1, 2, 3), fmt="BMP"), "image/bmp")),
        ("files", ("d.webp", image_bytes((50, 50), color=(9, 9, 9), fmt="WEBP"), "image/webp")),
        ("files", ("e.png", image_bytes((5, 5), mode="RGBA", color=(1, 2, 3, 4)), "image/png")),
    ]
    response = client.post(f"/datasets/{dataset_id}/images", data={"label": "cat"}, files=files)
    assert response.status_code == 201, response.text
    assert response.json() == {"added": 5, "duplicates": 0, "rejected": [], "conflicts": []}
    body = client.get(f"/datasets/{dataset_id}").json()
    assert body["num_images"] == 5
    assert body["classes"] == [{"name": "cat", "count": 5}]


def test_duplicate_bytes_are_counted_not_stored_twice(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    png = noise_png(1)
    first = client.post(
        f"/datasets/{dataset_id}/images",
        data={"label": "a"},
        files=[("files", ("x.png", png, "image/png")), ("files", ("same.png", png, "image/png"))],
    ).json()
    assert first == {"added": 1, "duplicates": 1, "rejected": [], "conflicts": []}
    again = client.post(
        f"/datasets/{dataset_id}/images", data={"label": "b"}, files=[("files", ("y.png", png, "image/png"))]
    ).json()
    # The same bytes under another label: still stored once, and the disagreement is named.
    assert again == {
        "added": 0,
        "duplicates": 1,
        "rejected": [],
        "conflicts": [
            {
                "filename": "y.png",
                "label": "b",
                "split": None,
                "existing_filename": "x.png",
                "existing_label": "a",
                "existing_split": None,
            }
        ],
    }
    assert client.get(f"/datasets/{dataset_id}").json()["num_images"] == 1


def test_bad_file_is_rejected_by_name_and_the_rest_still_added(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    good = noise_png(2)
    truncated = noise_png(3, size=(64, 64))[:100]
    response = client.post(
        f"/datasets/{dataset_id}/images",
        data={"label": "dog"},
        files=[
            ("files", ("good.png", good, "image/png")),
            ("files", ("notes.txt", b"just some text", "text/plain")),
            ("files", ("half.png", truncated, "image/png")),
            ("files", ("empty.png", b"", "image/png")),
        ],
    )
    assert response.status_code == 201
    body = response.json()
    assert body["added"] == 1
    rejected = {item["filename"]: item["reason"] for item in body["rejected"]}
    assert set(rejected) == {"notes.txt", "half.png", "empty.png"}
    assert "not a supported image" in rejected["notes.txt"]
    assert "truncated" in rejected["half.png"]
    assert rejected["empty.png"] == "empty file"


def test_request_with_only_bad_files_is_422_and_keeps_what_was_stored(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    client.post(
        f"/datasets/{dataset_id}/images",
        data={"label": "a"},
        files=[("files", ("ok.png", noise_png(4), "x"))],
    )
    response = client.post(
        f"/datasets/{dataset_id}/images",
        data={"label": "a"},
        files=[("files", ("broken.png", noise_png(5, size=(64, 64))[:60], "image/png"))],
    )
    assert response.status_code == 422
    body = response.json()
    assert "broken.png" in body["detail"]
    assert body["rejected"][0]["filename"] == "broken.png"
    assert client.get(f"/datasets/{dataset_id}").json()["num_images"] == 1


def test_oversized_file_is_rejected_with_the_limit(tmp_path, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(sqlite_url, max_image_bytes=500)
    with TestClient(create_app(settings)) as client:
        dataset_id = create_dataset(client)
        big = noise_png(6, size=(64, 64))
        response = client.post(
            f"/datasets/{dataset_id}/images",
            data={"label": "a"},
            files=[
                ("files", ("big.png", big, "image/png")),
                ("files", ("small.png", image_bytes((2, 2)), "x")),
            ],
        )
        assert response.status_code == 201
        assert response.json()["rejected"] == [
            {"filename": "big.png", "reason": "larger than the 500-byte image limit"}
        ]


def test_bad_label_is_422(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    for label in ["../etc", " padded", "a/b"]:
        response = client.post(
            f"/datasets/{dataset_id}/images",
            data={"label": label},
            files=[("files", ("a.png", noise_png(7), "x"))],
        )
        assert response.status_code == 422, label
        assert "label" in response.json()["detail"]


def test_missing_label_or_files_is_422_naming_the_field(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    response = client.post(f"/datasets/{dataset_id}/images", files=[("files", ("a.png", noise_png(8), "x"))])
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "label"]


def test_unknown_dataset_is_404(client: TestClient) -> None:
    assert client.get("/datasets/999").status_code == 404
    response = client.post(
        "/datasets/999/images", data={"label": "a"}, files=[("files", ("a.png", noise_png(9), "x"))]
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "dataset 999 not found"}
    response = client.post(
        "/datasets/999/archive", files={"file": ("d.zip", zip_bytes([]), "application/zip")}
    )
    assert response.status_code == 404


def test_archive_in_imagefolder_layout(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    samples = digits()[:40]
    archive = zip_bytes([(f"digits/{label}/{i}.png", data) for i, (label, data) in enumerate(samples)])
    response = client.post(f"/datasets/{dataset_id}/archive", files={"file": ("digits.zip", archive, "x")})
    assert response.status_code == 201, response.text
    assert response.json()["added"] == 40
    body = client.get(f"/datasets/{dataset_id}").json()
    assert sum(c["count"] for c in body["classes"]) == 40
    assert {c["name"] for c in body["classes"]} == {label for label, _ in samples}
    assert body["splits"] == {"unassigned": 40}


def test_archive_with_fixed_splits_and_bad_entries(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    archive = zip_bytes(
        [
            ("train/cat/1.png", noise_png(10)),
            ("train/dog/2.png", noise_png(11)),
            ("val/cat/3.png", noise_png(12)),
            ("test/dog/4.png", noise_png(13)),
            ("train/dog/readme.txt", b"hello"),
            ("../evil.png", noise_png(14)),
        ]
    )
    body = client.post(f"/datasets/{dataset_id}/archive", files={"file": ("d.zip", archive, "x")}).json()
    assert body["added"] == 4
    assert {r["filename"] for r in body["rejected"]} == {"train/dog/readme.txt", "../evil.png"}
    splits = client.get(f"/datasets/{dataset_id}").json()["splits"]
    assert splits == {"train": 2, "val": 1, "test": 1}


def test_archive_that_is_not_a_zip_is_422(client: TestClient) -> None:
    dataset_id = create_dataset(client)
    for content in [b"PK\x03\x04 definitely not a zip", noise_png(15), b""]:
        response = client.post(f"/datasets/{dataset_id}/archive", files={"file": ("d.zip", content, "x")})
        assert response.status_code == 422
        assert "zip" in response.json()["detail"]


def test_models_are_listed_with_default_sizes(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()}
    assert {"lenet", "simple_cnn", "alexnet", "resnet18", "mobilenet_v3_small"} <= set(models)
    assert models["simple_cnn"]["default_image_size"] == 28
    assert models["resnet18"]["default_image_size"] == 224


def test_health(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"


def test_control_characters_in_names_never_reach_the_database(client: TestClient, settings: Settings) -> None:
    """PostgreSQL text cannot hold NUL: a file name with one is stored with '?' instead, not a 500."""
    from sqlalchemy import select

    from app.db.session import read_scope
    from app.db.tables import Image

    assert client.post("/datasets", json={"name": "a\x00b"}).status_code == 422
    dataset_id = create_dataset(client)
    # raw bytes: httpx would percent-encode the NUL in a file name, a hostile client does not
    body = (
        b'--B\r\nContent-Disposition: form-data; name="label"\r\n\r\na\r\n'
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="evil\x00name\x1b.png"\r\n\r\n'
        + noise_png(77)
        + b"\r\n--B--\r\n"
    )
    response = client.post(
        f"/datasets/{dataset_id}/images",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["added"] == 1
    with read_scope(settings) as session:
        assert (
            session.scalar(select(Image.filename).where(Image.dataset_id == dataset_id)) == "evil?name?.png"
        )
