"""Accuracy bar: scikit-learn's 1,797 handwritten digits, upsampled to each model's input, default split.

Trains through the real service path (a temporary SQLite database, the HTTP API in-process, the real
worker loop) and compares the test accuracy with scikit-learn's own SVC example (gamma=0.001) on
exactly the same test images.

    .venv/bin/python bench/digits_accuracy.py                 # simple_cnn, lenet, resnet18
    .venv/bin/python bench/digits_accuracy.py simple_cnn      # one model
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from app.core.config import Settings
from app.main import create_app
from migrations import upgrade_to_head
from workers.loop import serve
from workers.splits import stratified_split

# Extra options per model beyond the defaults: resnet18 at its 224-pixel default would take most of
# an hour per run on a 2-core CPU, so the benchmark gives it 32-pixel inputs.
RUNS: dict[str, dict[str, Any]] = {
    "simple_cnn": {},
    "lenet": {},
    "resnet18": {"image_size": 32},
}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((array * 255 / 16).astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def svc_baseline(images: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """scikit-learn's digits example classifier on the split every job uses."""
    order = np.argsort(labels, kind="stable")  # the order in which the images are uploaded below
    split = stratified_split(
        labels[order].tolist(), [None] * len(order), val_fraction=0.2, test_fraction=0.1, seed=seed
    )
    features = images[order].reshape(len(order), -1)
    train = split["train"] + split["val"]  # SVC has no use for a validation set
    model = SVC(gamma=0.001).fit(features[train], labels[order][train])
    return float((model.predict(features[split["test"]]) == labels[order][split["test"]]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the job spec's default")
    args = parser.parse_args()

    digits = load_digits()
    svc_accuracy = svc_baseline(digits.images, digits.target, seed=0)
    print(f"scikit-learn SVC(gamma=0.001) test accuracy: {svc_accuracy:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade_to_head(url)
        # In-process TestClient: its requests carry `Host: testserver`.
        settings = Settings(
            database_url=url, device="cpu", worker_poll_seconds=0.1, allowed_hosts=["testserver"]
        )
        with TestClient(create_app(settings)) as client:
            dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]
            for label in range(10):
                files = [
                    ("files", (f"{i}.png", png(digits.images[i]), "image/png"))
                    for i in np.flatnonzero(digits.target == label)
                ]
                client.post(f"/datasets/{dataset_id}/images", data={"label": str(label)}, files=files)

            print(
                "\n| model | spec beyond the defaults | epochs | best epoch | test accuracy | vs SVC | time |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for name in args.models:
                extra = dict(RUNS.get(name, {}))
                if args.epochs:
                    extra["epochs"] = args.epochs
                job = client.post("/jobs", json={"dataset_id": dataset_id, "model": name, **extra}).json()
                started = time.perf_counter()
                serve(settings, once=True)
                seconds = time.perf_counter() - started
                done = client.get(f"/jobs/{job['id']}").json()
                evaluation = client.get(f"/jobs/{job['id']}/evaluation").json()
                accuracy = evaluation["accuracy"]
                print(
                    f"| {name} | {extra or '-'} | {done['spec']['epochs']} | {done['best']['epoch']} "
                    f"| {accuracy:.4f} ({evaluation['num_samples']} images) "
                    f"| {accuracy - svc_accuracy:+.4f} | {seconds:.0f} s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
