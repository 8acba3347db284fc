"""`trainserve submit --follow / jobs / follow / logs / predict` as real processes against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import trainserve_up
from tests.factories import digits, zip_bytes

pytestmark = pytest.mark.e2e

KEY = "cli-test-key"


def trainserve(
    *args: str, url: str, key: str | None = KEY, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The `trainserve` command in a child process; the key comes from the environment, as a user sets it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    env["TRAINSERVE_URL"] = url
    env["COLUMNS"] = "160"
    if key:
        env["TRAINSERVE_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, int]]:
    """A locked `trainserve up` (SQLite) with a 3-class digits dataset."""
    root = tmp_path_factory.mktemp("cli")
    url = f"sqlite:///{root / 'trainserve.db'}"
    with trainserve_up(url, root / "up.log", TRAINSERVE_API_KEYS=KEY) as (client, _process):
        client.headers["Authorization"] = f"Bearer {KEY}"
        dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]
        archive = zip_bytes(
            [(f"{label}/{i}.png", data) for i, (label, data) in enumerate(digits()[:300]) if label in "012"]
        )
        response = client.post(f"/datasets/{dataset_id}/archive", files={"file": ("d.zip", archive)})
        assert response.status_code == 201, response.text
        yield client, dataset_id


def test_submit_follow_shows_progress_and_epoch_table_then_jobs_logs_predict(
    server: tuple[httpx.Client, int], tmp_path: Path
) -> None:
    client, dataset_id = server
    url = str(client.base_url)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"dataset_id: {dataset_id}\nmodel: lenet\nepochs: 3\nbatch_size: 16\n")

    result = trainserve("submit", str(spec), "--follow", "--set", "seed=7", url=url)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "queued" in out and "/ui#/jobs/" in out
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3: train loss" in out
    assert "train loss" in out and "val acc" in out  # the final table's header
    assert "test evaluation" in out and "succeeded" in out.splitlines()[-1]
    job_id = int(out.split("job ", 1)[1].split()[0])
    assert client.get(f"/jobs/{job_id}").json()["spec"]["seed"] == 7

    listed = trainserve("jobs", url=url)
    assert listed.returncode == 0, listed.stderr
    assert "succeeded" in listed.stdout and "lenet" in listed.stdout and "100%" in listed.stdout
    as_json = json.loads(trainserve("jobs", "--json", url=url).stdout)
    assert [job["id"] for job in as_json] == [job_id]

    logs = trainserve("logs", str(job_id), url=url)
    assert logs.returncode == 0 and "epoch 3/3" in logs.stdout and "ending succeeded" in logs.stdout

    # Following a finished job replays it and ends at once.
    again = trainserve("follow", str(job_id), url=url)
    assert again.returncode == 0 and "epoch 3/3: train loss" in again.stdout

    _, data = next(item for item in digits()[300:] if item[0] == "2")
    image = tmp_path / "two.png"
    image.write_bytes(data)
    predicted = trainserve("predict", "--job", str(job_id), str(image), "--json", url=url)
    assert predicted.returncode == 0, predicted.stderr
    [answer] = json.loads(predicted.stdout)
    assert set(answer["scores"]) == {"0", "1", "2"}
    assert abs(sum(answer["scores"].values()) - 1) < 1e-4
    table = trainserve("predict", "--job", str(job_id), str(image), url=url)
    assert table.returncode == 0 and answer["label"] in table.stdout and "probability" in table.stdout


def test_cli_errors_are_one_readable_line(server: tuple[httpx.Client, int], tmp_path: Path) -> None:
    client, dataset_id = server
    url = str(client.base_url)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"dataset_id": dataset_id, "model": "lenet", "epochs": 0}))

    no_key = trainserve("jobs", url=url, key=None)
    assert no_key.returncode == 3 and "401" in no_key.stderr and "TRAINSERVE_API_KEY" in no_key.stderr
    bad = trainserve("submit", str(spec), url=url)
    assert bad.returncode == 3 and "422" in bad.stderr and "epochs" in bad.stderr
    missing = trainserve("submit", str(tmp_path / "nope.yaml"), url=url)
    assert missing.returncode == 2 and "nope.yaml" in missing.stdout
    wrong_set = trainserve("submit", str(spec), "--set", "epochs", url=url)
    assert wrong_set.returncode == 2 and "KEY=VALUE" in wrong_set.stdout
    unknown_job = trainserve("predict", "--job", "999", str(spec), url=url)
    assert unknown_job.returncode == 3 and "404" in unknown_job.stderr
    down = trainserve("jobs", url="http://127.0.0.1:9", key=None)
    assert down.returncode == 3 and "cannot reach" in down.stderr
