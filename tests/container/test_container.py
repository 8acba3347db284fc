"""The deployment as users run it: the image built from the Dockerfile, docker-compose.yml under
podman-compose, a model trained inside the worker container, everything surviving `down` and `up`.

Run by `make test-container` (not by `make test`: the image is gigabytes). Skipped where podman is absent.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.container.podman import (
    IMAGE,
    ROOT,
    ComposeProject,
    build_image,
    image_config,
    missing_tools,
    prune_images,
    run,
)
from tests.factories import digits, zip_bytes

if missing_tools():
    pytest.skip(
        f"container test not run: {', '.join(missing_tools())} not installed "
        "(../shared/tools/container-setup installs both)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(2400)

# Faster polling than the defaults, so the test does not wait on idle workers; the rest is as shipped.
TEST_SETTINGS = {
    "TRAINSERVE_DEVICE": "cpu",
    "TRAINSERVE_WORKER_POLL_SECONDS": "0.5",
    "TRAINSERVE_PROGRESS_INTERVAL_SECONDS": "0.5",
}


def step(message: str, started: float) -> None:
    print(f"[container test {time.monotonic() - started:6.1f}s] {message}", flush=True)


# Run inside the image as its default user: who am I, who owns the code, where can I write?
PROBE = """
import json, os, pathlib
import app, workers

package = pathlib.Path(app.__file__).parent
result = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "package": str(package),
    "package_owner": package.stat().st_uid,
    "workers_owner": pathlib.Path(workers.__file__).stat().st_uid,
}
targets = {"app": package, "venv": pathlib.Path("/opt/venv"), "data": pathlib.Path("/data")}
for name, directory in targets.items():
    try:
        (directory / "probe.txt").write_text("x")
        result[name] = "written"
    except OSError as exc:
        result[name] = type(exc).__name__
print(json.dumps(result))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image built from the working tree. Once it is built, the project's older images (left dangling by
    it) are pruned; again at the end."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    seconds = build_image(log)
    print(f"\n[container test] podman build --format docker: {seconds:.1f}s", flush=True)
    prune_images()
    yield IMAGE
    prune_images()


@pytest.fixture
def project(tmp_path: Path) -> Iterator[ComposeProject]:
    env_file = tmp_path / "settings.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in TEST_SETTINGS.items()))
    compose = ComposeProject(
        name=f"trainserve-test-{uuid.uuid4().hex[:8]}", port=free_port(), env_file=env_file
    )
    try:
        yield compose
    finally:
        compose.remove()
        leftovers = run(
            ["podman", "volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={compose.name}"],
            timeout=60,
        ).stdout.split()
        assert leftovers == [], f"volumes left behind: {leftovers}"


def test_image_runs_as_non_root_with_read_only_application(image: str) -> None:
    config = image_config(image)
    assert config["Config"]["User"] == "trainserve:trainserve"
    # Kept only by a Docker-format build: podman's default OCI format would drop it.
    healthcheck = config.get("Healthcheck") or config["Config"].get("Healthcheck") or {}
    assert any("/health" in part for part in healthcheck.get("Test", [])), config
    assert "/data" in config["Config"]["Volumes"]

    out = run(["podman", "run", "--rm", image, "python", "-c", PROBE], timeout=120).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["uid"] == 10001 and result["gid"] == 10001, result
    assert result["package_owner"] == 0 and result["workers_owner"] == 0, result
    assert result["package"].startswith("/opt/venv/"), result
    assert result["app"] == "PermissionError", result
    assert result["venv"] == "PermissionError", result
    assert result["data"] == "written", result  # the volume is the one writable place


def wait_for_job(client: httpx.Client, job_id: int, done: set[str], timeout: float = 300) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in done:
            return job  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"job {job_id} not {done} after {timeout}s: {job}"
        time.sleep(0.5)


def timed_down(project: ComposeProject) -> float:
    started = time.monotonic()
    project.compose("down", timeout=120)
    return time.monotonic() - started


def follow_logs(container: str, path: Path) -> subprocess.Popen[bytes]:
    """`podman logs --follow` into a file: the log outlives the container that `down` removes."""
    with open(path, "wb") as handle:
        return subprocess.Popen(
            ["podman", "logs", "--follow", container], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )


def test_compose_trains_in_the_worker_and_keeps_everything_across_down_and_up(
    image: str, project: ComposeProject, tmp_path: Path
) -> None:
    started = time.monotonic()
    project.compose("up", "--detach")
    step(f"podman-compose up -d (project {project.name}, API on 127.0.0.1:{project.port})", started)
    step(f"api healthy after {project.wait_healthy():.1f}s", started)
    (worker,) = project.containers("worker")

    client = httpx.Client(base_url=f"http://127.0.0.1:{project.port}", timeout=120)
    assert client.get("/health").json()["status"] == "ok"

    # The digits, as one ImageFolder zip.
    samples = digits()
    dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]
    archive = zip_bytes([(f"{label}/{i}.png", data) for i, (label, data) in enumerate(samples)])
    response = client.post(
        f"/datasets/{dataset_id}/archive", files={"file": ("digits.zip", archive, "application/zip")}
    )
    assert response.status_code == 201, response.text
    dataset = client.get(f"/datasets/{dataset_id}").json()
    assert dataset["num_images"] == len({data for _, data in samples})
    step(f"uploaded {dataset['num_images']} digits as a zip", started)

    # Train simple_cnn for 2 epochs: in the worker container (its hostname is in the job's worker id).
    job = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 2}).json()
    done = wait_for_job(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", f"{done}\n{project.logs(worker)[-3000:]}"
    assert done["worker_id"].startswith(project.hostname(worker) + ":"), done
    assert f"job {job['id']}: ending succeeded" in project.logs(worker)
    metrics = client.get(f"/jobs/{job['id']}/metrics").json()
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][-1]["val_acc"] > 0.5, metrics  # chance is 0.1
    val_acc = metrics["epochs"][-1]["val_acc"]
    step(f"trained simple_cnn for 2 epochs in the worker container: val_acc {val_acc:.3f}", started)

    label, image_bytes = samples[7]
    prediction = client.post(
        "/predict", data={"job_id": job["id"]}, files={"file": ("digit.png", image_bytes, "image/png")}
    )
    assert prediction.status_code == 200, prediction.text
    assert set(prediction.json()["scores"]) == set("0123456789")
    assert sum(prediction.json()["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    checkpoint = client.get(f"/jobs/{job['id']}/checkpoint")
    assert checkpoint.status_code == 200 and len(checkpoint.content) > 1000
    checkpoint_sha = hashlib.sha256(checkpoint.content).hexdigest()
    predicted = prediction.json()["label"]
    step(f"predicted '{predicted}' for a '{label}'; checkpoint {len(checkpoint.content)} bytes", started)

    # A long job, running when the project goes down: the worker must hand it back, not be killed.
    long_job = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 500}
    ).json()
    deadline = time.monotonic() + 120
    while not client.get(f"/jobs/{long_job['id']}/metrics").json()["epochs"]:
        assert time.monotonic() < deadline, client.get(f"/jobs/{long_job['id']}").json()
        time.sleep(0.5)
    first_worker_id = client.get(f"/jobs/{long_job['id']}").json()["worker_id"]
    client.close()
    worker_log = tmp_path / "worker.log"
    follower = follow_logs(worker, worker_log)
    time.sleep(1)  # let `logs --follow` attach before the container stops
    seconds = timed_down(project)
    follower.wait(timeout=30)
    log_text = worker_log.read_text()
    step(f"podman-compose down with a job training: {seconds:.1f}s", started)
    assert seconds < 10, f"down took {seconds:.1f}s\n{log_text[-3000:]}"
    assert "worker got signal 15" in log_text, log_text[-3000:]
    assert f"job {long_job['id']}: ending queued" in log_text, log_text[-3000:]  # handed back, not killed
    assert project.containers("api", running_only=False) == []

    # Up again, with three workers: the data is all on the volume.
    project.compose("up", "--detach", "--scale", "worker=3")
    step(f"podman-compose up -d --scale worker=3: api healthy after {project.wait_healthy():.1f}s", started)
    workers = project.containers("worker")
    assert len(workers) == 3, workers
    client = httpx.Client(base_url=f"http://127.0.0.1:{project.port}", timeout=120)
    assert client.get(f"/datasets/{dataset_id}").json()["num_images"] == dataset["num_images"]
    again = client.get(f"/jobs/{job['id']}").json()
    assert again["status"] == "succeeded" and again["best"] == done["best"]
    assert client.get(f"/jobs/{job['id']}/metrics").json()["epochs"] == metrics["epochs"]
    checkpoint = client.get(f"/jobs/{job['id']}/checkpoint")
    assert hashlib.sha256(checkpoint.content).hexdigest() == checkpoint_sha
    repeat = client.post(
        "/predict", data={"job_id": job["id"]}, files={"file": ("digit.png", image_bytes, "image/png")}
    )
    assert repeat.status_code == 200, repeat.text
    assert repeat.json()["label"] == prediction.json()["label"]
    assert repeat.json()["scores"] == pytest.approx(prediction.json()["scores"], abs=1e-5)
    step("after up: dataset, job, metrics, checkpoint unchanged; predict answers the same", started)

    # The handed-back job is resumed by one of the new workers, from its last finished epoch. (Had its
    # worker been killed, the job would stay `running` under the old worker id for the whole lease timeout.)
    deadline = time.monotonic() + 120
    while True:
        resumed = client.get(f"/jobs/{long_job['id']}").json()
        if resumed["status"] == "running" and resumed["info"].get("resumed_from_epoch"):
            break
        assert time.monotonic() < deadline, resumed
        time.sleep(0.5)
    assert resumed["worker_id"] != first_worker_id
    step(f"long job resumed from epoch {resumed['info']['resumed_from_epoch']} by a new worker", started)
    client.close()

    seconds = timed_down(project)
    step(f"podman-compose down with three workers, one training: {seconds:.1f}s", started)
    assert seconds < 10
