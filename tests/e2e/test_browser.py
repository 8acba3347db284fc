"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright) against a live
`trainserve up` with an API key: drop a zip, start a job from the form, watch the curves grow over the
events stream, predict a dropped image. Screenshots go to var/screenshots/ (or $TRAINSERVE_SCREENSHOTS).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.processes import trainserve_up
from tests.factories import digits, zip_bytes

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
KEY = "browser-test-key"
INSTALL_HINT = (
    "install it with `apt-get install -y chromium` (Debian's browser; as root) and "
    "`pip install -e '.[test]'` (the playwright package; never `playwright install`)"
)


def chromium_path() -> str | None:
    path = os.environ.get("TRAINSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).exists() else None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip(f"no Chromium found: {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"the playwright package is missing: {INSTALL_HINT}")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("browser")
    with trainserve_up(f"sqlite:///{root / 'trainserve.db'}", root / "up.log", TRAINSERVE_API_KEYS=KEY) as (
        client,
        _process,
    ):
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client


@pytest.fixture(scope="module")
def shots() -> Path:
    directory = Path(os.environ.get("TRAINSERVE_SCREENSHOTS", ROOT / "var" / "screenshots"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def drop_file(page: Any, selector: str, name: str, data: bytes, mime: str) -> None:
    """A real drop event carrying a File, as when a person drags one from their desktop."""
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


@pytest.fixture
def page(browser: Any, shots: Path) -> Iterator[Any]:
    """A fresh browser tab; on a failure its last state is saved as failure.png for the person debugging."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    tab.errors = errors
    try:
        yield tab
    except BaseException:
        tab.screenshot(path=str(shots / "failure.png"), full_page=True)
        raise
    finally:
        context.close()


def test_dashboard_upload_train_watch_predict(page: Any, server: httpx.Client, shots: Path) -> None:
    started = time.perf_counter()
    base = str(server.base_url)
    samples = digits()
    held_out = samples[-1]  # not uploaded: predicted at the end
    per_class: dict[str, int] = {}
    entries = []
    for i, (label, data) in enumerate(samples[:-1]):  # 60 per class keeps the test lean
        if per_class.setdefault(label, 0) < 60:
            per_class[label] += 1
            entries.append((f"digits/{label}/{i}.png", data))
    archive = zip_bytes(entries)

    # The server has API keys: the page asks for one before anything else.
    page.goto(f"{base}/ui#/datasets")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.fill("#new-dataset-name", "digits")
    page.click("text=Create dataset")
    page.wait_for_url("**/ui#/datasets/*")

    # Drop the zip on the dataset page: class counts and a thumbnail grid per class appear.
    drop_file(page, "#dataset-drop", "digits.zip", archive, "application/zip")
    page.wait_for_selector("text=600 images in 10 classes")
    page.wait_for_function(
        "() => document.querySelectorAll('img.thumb').length === 120 && "
        "[...document.querySelectorAll('img.thumb')].every((img) => img.complete && img.naturalWidth > 0)"
    )
    assert page.locator(".class-row").count() == 10
    page.screenshot(path=str(shots / "1-dataset.png"), full_page=True)

    # The form is built from the job-spec schema, with the defaults shown.
    page.click("text=Train a model on it")
    page.wait_for_selector("#job-form")
    assert page.input_value("#f-epochs") == "10" and page.input_value("#f-batch_size") == "64"
    assert page.locator("#f-optimizer option:checked").inner_text() == "adamw"
    page.select_option("#f-model", "simple_cnn")
    page.fill("#f-epochs", "4")
    page.screenshot(path=str(shots / "2-new-job.png"), full_page=True)
    page.click("#start-job")
    page.wait_for_function("() => /^#\\/jobs\\/\\d+$/.test(location.hash)")
    job_id = int(page.url.rsplit("/", 1)[1])

    # Live: the curves grow over the events stream while the job trains.
    page.wait_for_function(
        "() => document.querySelectorAll('#loss-chart circle.point[data-series=\"validation\"]').length >= 2"
    )
    live_points = page.locator('#acc-chart circle.point[data-series="train"]').count()
    status_then = server.get(f"/jobs/{job_id}").json()["status"]
    page.screenshot(path=str(shots / "3-job-live.png"), full_page=True)

    # A second job (through the API) to compare with; then the finished page has the evaluation.
    second = server.post(
        "/jobs", json={"dataset_id": 1, "model": "lenet", "epochs": 3, "lr": 0.003, "batch_size": 32}
    ).json()
    page.wait_for_selector("main[data-ended=true]", timeout=240_000)
    page.wait_for_selector("#confusion-matrix")
    assert page.locator('#loss-chart circle.point[data-series="train"]').count() == 4
    assert page.locator("#per-class tr").count() == 11  # header + 10 classes
    assert page.locator("#job-logs").inner_text().count("epoch") >= 4
    assert page.locator("#download-checkpoint").is_visible()
    page.screenshot(path=str(shots / "4-job-finished.png"), full_page=True)

    deadline = time.monotonic() + 240
    while server.get(f"/jobs/{second['id']}").json()["status"] not in {"succeeded", "failed"}:
        assert time.monotonic() < deadline, "the second job did not finish"
        time.sleep(0.5)
    page.goto(f"{base}/ui#/jobs")
    page.wait_for_selector(f"#jobs-table tr[data-job='{second['id']}'][data-status=succeeded]")
    page.screenshot(path=str(shots / "5-jobs.png"), full_page=True)
    page.goto(f"{base}/ui#/compare?ids={job_id},{second['id']}&metric=val_acc")
    page.wait_for_function("() => document.querySelectorAll('#compare-chart circle.point').length === 7")
    page.screenshot(path=str(shots / "6-compare.png"), full_page=True)

    # Predict: drop an image the model never saw; a bar per class, the top one named.
    page.goto(f"{base}/ui#/predict?job={job_id}")
    page.wait_for_selector("#predict-drop")
    drop_file(page, "#predict-drop", "mystery.png", held_out[1], "image/png")
    page.wait_for_selector("#probabilities")
    assert page.locator("#probabilities rect.bar").count() == 10
    expected = server.post(
        "/predict", data={"job_id": str(job_id)}, files={"file": ("m.png", held_out[1], "image/png")}
    ).json()
    assert page.inner_text("#predicted-label").startswith(expected["label"])
    page.screenshot(path=str(shots / "7-predict.png"), full_page=True)

    assert page.errors == [], page.errors
    print(  # the README records how long this takes
        f"\nbrowser test: {time.perf_counter() - started:.1f} s; live screenshot at {live_points} epoch(s), "
        f"job then {status_then}; screenshots in {shots}"
    )


def test_api_docs_load_nothing_from_elsewhere(page: Any, server: httpx.Client, shots: Path) -> None:
    """Issue 21, item 6: /docs renders from this server's own pinned assets (FastAPI's page loaded
    unpinned scripts from a CDN into the origin where the dashboard keeps the API key); /redoc is off."""
    base = str(server.base_url).rstrip("/")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{base}/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "trainserve" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path >> text=/predict")
    page.screenshot(path=str(shots / "docs-swagger.png"))
    assert page.errors == [], page.errors  # a blocked outside load would show here too (CSP)
    elsewhere = [url for url in requested if not url.startswith((base + "/", "data:", "blob:"))]
    assert elsewhere == [], elsewhere
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in requested)
    assert page.goto(f"{base}/redoc").status == 404
