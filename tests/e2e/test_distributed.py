"""Data-parallel jobs on real worker processes (gloo on the CPU): two processes on one worker, two nodes
on two workers, a rank SIGKILLed, a worker SIGTERMed and a job cancelled, and a gang that waits for its
second worker. No rank may outlive its worker."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from torch import nn

from app.core.config import Settings
from app.db.session import read_scope
from app.db.tables import JobSlot
from app.main import create_app
from app.schemas.jobs import JobSpec
from app.services.jobs import best_checkpoint
from migrations import upgrade_to_head
from models.predictor import model_from_checkpoint
from models.preprocessing import Preprocessing
from tests.conftest import make_settings
from tests.e2e import processes
from tests.factories import digits
from workers.data import decode_dataset, list_images
from workers.engine import EvalResult, evaluate
from workers.splits import stratified_split

pytestmark = pytest.mark.e2e

WORKER_SETTINGS = {
    "TRAINSERVE_ADVERTISE_HOST": "127.0.0.1",
    "TRAINSERVE_HEARTBEAT_SECONDS": "0.5",
    "TRAINSERVE_LEASE_TIMEOUT_SECONDS": "30",
    # Two workers (two "nodes") share this machine's cores: one thread per rank, not all cores each,
    # and one per single-process job (oversubscribed OpenMP threads crawl on a loaded 2-core machine).
    "TRAINSERVE_RANK_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}


def upload_digits(client: TestClient, *, limit: int | None = None, classes: str = "0123456789") -> int:
    dataset_id = int(client.post("/datasets", json={"name": "digits"}).json()["id"])
    by_label: dict[str, list[bytes]] = {}
    for label, data in digits()[:limit]:
        if label in classes:
            by_label.setdefault(label, []).append(data)
    for label, images in by_label.items():
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        assert (
            client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files).status_code
            == 201
        )
    return dataset_id


def submit(client: TestClient, **spec: Any) -> int:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def wait_until(predicate: Callable[[], bool], timeout: float = 600, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rank_pids(worker: subprocess.Popen[bytes]) -> list[int]:
    """The worker's rank processes (spawned interpreters), not multiprocessing's resource tracker."""
    out = []
    for pid in children(worker.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            out.append(pid)
    return sorted(out)


class Workers:
    """Worker processes started by a test, with every process they ever started recorded, so that the
    test can check at the end that none of them is left running."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seen: set[int] = set()

    def start(self, **extra: str) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"worker{len(self.procs) + 1}.log"
        proc = processes.start_worker(self.settings.database_url, log, **{**WORKER_SETTINGS, **extra})
        self.procs.append(proc)
        return proc

    def watch(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.seen |= children(proc.pid)

    def logs(self) -> str:
        return "".join(path.read_text() for path in sorted(self.log_dir.glob("worker*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_workers(settings: Settings, log_dir: Path) -> Iterator[Workers]:
    workers = Workers(settings, log_dir)
    try:
        yield workers
    finally:
        workers.stop()
    time.sleep(1)
    left = sorted(pid for pid in workers.seen if alive(pid))
    assert left == [], f"processes left running: {left}"


def wait_for_job(
    client: TestClient, workers: Workers, job_id: int, statuses: set[str], timeout: float = 900
) -> dict:  # type: ignore[type-arg]
    def done() -> bool:
        workers.watch()
        return client.get(f"/jobs/{job_id}").json()["status"] in statuses

    wait_until(done, timeout, f"job {job_id} to reach {statuses}\n{workers.logs()[-4000:]}")
    return client.get(f"/jobs/{job_id}").json()  # type: ignore[no-any-return]


def single_process_validation(settings: Settings, job: dict[str, Any]) -> EvalResult:  # type: ignore[type-arg]
    """The job's best checkpoint evaluated on its validation split in this one process."""
    spec = JobSpec.model_validate(job["spec"])
    with read_scope(settings) as session:
        records = list_images(session, spec.dataset_id, max_id=job["info"]["image_cutoff_id"])
        weights = best_checkpoint(session, job["id"]).weights
    model, meta = model_from_checkpoint(weights)
    preprocessing = Preprocessing.from_meta(meta["preprocessing"])
    targets = torch.tensor([meta["classes"].index(r.label) for r in records])
    splits = stratified_split(
        targets.tolist(),
        [r.split for r in records],
        val_fraction=spec.val_fraction,
        test_fraction=spec.test_fraction,
        seed=spec.seed,
    )
    images = decode_dataset(settings, records, preprocessing, on_progress=lambda *_: None)
    return evaluate(
        model,
        nn.CrossEntropyLoss(),
        images,
        targets,
        torch.tensor(splits["val"]),
        num_classes=len(meta["classes"]),
        batch_size=256,
        preprocessing=preprocessing,
        device=torch.device("cpu"),
    )


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'trainserve.db'}"
    upgrade_to_head(url)
    return make_settings(url)


@pytest.mark.timeout(900)  # three 10-epoch jobs on the full digits: minutes on a loaded 2-core machine
def test_two_processes_and_two_nodes_train_like_one_process(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    settings = sqlite_settings
    with TestClient(create_app(settings)) as client:
        dataset_id = upload_digits(client)
        # One point of test accuracy is 5.4 of the 539 test images. The effective batch is the same
        # everywhere (32 = 2 x 16): the same optimiser steps per epoch at the same learning rate.
        base = {
            "dataset_id": dataset_id,
            "model": "simple_cnn",
            "epochs": 10,
            "test_fraction": 0.3,
            "seed": 0,
        }
        single = submit(client, **base, batch_size=32)
        two_processes = submit(client, **base, batch_size=16, devices=2)
        two_nodes = submit(client, **base, batch_size=16, nodes=2)
        with running_workers(settings, tmp_path) as workers:
            workers.start(TRAINSERVE_GANG_SLOT_TIMEOUT_SECONDS="900")
            workers.start(TRAINSERVE_GANG_SLOT_TIMEOUT_SECONDS="900")
            for job_id in (single, two_processes, two_nodes):
                wait_for_job(client, workers, job_id, {"succeeded", "failed", "cancelled"})

        jobs = {job_id: client.get(f"/jobs/{job_id}").json() for job_id in (single, two_processes, two_nodes)}
        assert {job["status"] for job in jobs.values()} == {"succeeded"}, jobs
        rows = {job_id: client.get(f"/jobs/{job_id}/metrics").json()["epochs"] for job_id in jobs}
        for job_rows in rows.values():
            assert [row["epoch"] for row in job_rows] == list(range(1, 11))

        info = jobs[two_processes]["info"]
        assert (info["world_size"], info["nodes"], info["devices_per_node"], info["backend"]) == (
            2,
            1,
            2,
            "gloo",
        )
        assert (info["effective_batch_size"], info["lr_scaling"], info["lr"]) == (32, "none", 0.001)
        info = jobs[two_nodes]["info"]
        assert (info["world_size"], info["nodes"], info["devices_per_node"]) == (2, 2, 1)
        assert len(set(info["workers"])) == 2  # two worker processes, one rank each
        assert jobs[single]["info"]["world_size"] == 1

        # Validation is over the whole split, exactly: the stored metrics of the best epoch are what one
        # process computes from the stored best checkpoint.
        for job_id in (two_processes, two_nodes):
            job = jobs[job_id]
            best_row = next(row for row in rows[job_id] if row["epoch"] == job["best"]["epoch"])
            check = single_process_validation(settings, job)
            assert best_row["val_acc"] == check.accuracy
            # Same predictions; the loss only differs in float rounding (other batch sizes and threads).
            assert best_row["val_loss"] == pytest.approx(check.loss, rel=1e-3)
            assert best_row["val_f1"] == pytest.approx(check.f1, abs=1e-7)

        accuracy = {job_id: client.get(f"/jobs/{job_id}/evaluation").json()["accuracy"] for job_id in jobs}
        print(
            f"\ntest accuracy: one process {accuracy[single]:.4f}, two processes "
            f"{accuracy[two_processes]:.4f}, two nodes {accuracy[two_nodes]:.4f}"
        )
        assert abs(accuracy[two_processes] - accuracy[single]) <= 0.01
        assert abs(accuracy[two_nodes] - accuracy[single]) <= 0.01


def test_a_rank_killed_mid_epoch_resumes_from_the_last_checkpoint(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    settings = sqlite_settings
    with TestClient(create_app(settings)) as client:
        dataset_id = upload_digits(client, limit=400)
        spec = {
            "dataset_id": dataset_id,
            "model": "simple_cnn",
            "epochs": 4,
            "image_size": 48,
            "batch_size": 8,
        }
        job_id = submit(client, **spec, devices=2)
        with running_workers(settings, tmp_path) as workers:
            worker = workers.start()

            def in_epoch_two() -> bool:
                workers.watch()
                progress = client.get(f"/jobs/{job_id}").json()["progress"]
                return progress.get("epoch") == 2 and progress.get("phase") == "training"

            wait_until(in_epoch_two, what=f"epoch 2\n{workers.logs()[-3000:]}")
            ranks = rank_pids(worker)
            assert len(ranks) == 2, ranks
            stored_before = [r["epoch"] for r in client.get(f"/jobs/{job_id}/metrics").json()["epochs"]]
            workers.seen |= set(ranks)
            os.kill(ranks[-1], signal.SIGKILL)
            job = wait_for_job(client, workers, job_id, {"succeeded", "failed", "cancelled"})
            assert worker.poll() is None  # the worker itself lived on and took the job up again
        logs = workers.logs()
        assert job["status"] == "succeeded", (job, logs[-3000:])
        assert job["attempts"] == 2
        assert stored_before == [1]
        assert job["info"]["resumed_from_epoch"] == 1
        assert "killed by SIGKILL" in logs
        epochs = [r["epoch"] for r in client.get(f"/jobs/{job_id}/metrics").json()["epochs"]]
        assert epochs == [1, 2, 3, 4]
        assert client.get(f"/jobs/{job_id}/evaluation").status_code == 200


def test_sigterm_and_cancel_stop_every_rank_within_a_batch(sqlite_settings: Settings, tmp_path: Path) -> None:
    settings = sqlite_settings
    with TestClient(create_app(settings)) as client:
        dataset_id = upload_digits(client, limit=400)
        spec = {
            "dataset_id": dataset_id,
            "model": "simple_cnn",
            "epochs": 20,
            "image_size": 48,
            "batch_size": 8,
        }
        job_id = submit(client, **spec, devices=2)
        with running_workers(settings, tmp_path) as workers:
            first = workers.start()

            def training_in(epoch: int) -> Callable[[], bool]:
                def check() -> bool:
                    workers.watch()
                    progress = client.get(f"/jobs/{job_id}").json()["progress"]
                    return progress.get("epoch") == epoch and progress.get("phase") == "training"

                return check

            wait_until(training_in(1), what=f"epoch 1\n{workers.logs()[-3000:]}")
            ranks = rank_pids(first)
            assert len(ranks) == 2
            first.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert first.wait(timeout=60) == 0
            print(f"\nworker and ranks exited {time.monotonic() - started:.1f} s after SIGTERM")
            assert not [pid for pid in ranks if alive(pid)]
            job = client.get(f"/jobs/{job_id}").json()
            assert job["status"] == "queued" and "worker shut down" in job["progress"]["requeued_because"]

            second = workers.start()
            wait_until(training_in(2), what=f"epoch 2 again\n{workers.logs()[-3000:]}")
            ranks = rank_pids(second)
            assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
            job = wait_for_job(client, workers, job_id, {"cancelled", "succeeded", "failed"}, timeout=120)
            wait_until(lambda: not [pid for pid in ranks if alive(pid)], 30, "the ranks to exit")
            assert second.poll() is None  # the worker goes on serving
        assert job["status"] == "cancelled", job
        epochs = [r["epoch"] for r in client.get(f"/jobs/{job_id}/metrics").json()["epochs"]]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1
        assert client.get(f"/jobs/{job_id}/checkpoint").status_code == 200


def test_a_two_node_job_waits_for_its_second_worker(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url)
    with TestClient(create_app(settings)) as client:
        dataset_id = upload_digits(client, limit=200, classes="0123")
        job_id = submit(client, dataset_id=dataset_id, model="lenet", epochs=2, batch_size=16, nodes=2)

        def held() -> int:
            with read_scope(settings) as session:
                return int(session.scalar(select(func.count()).select_from(JobSlot)) or 0)

        with running_workers(settings, tmp_path) as workers:
            workers.start(TRAINSERVE_GANG_SLOT_TIMEOUT_SECONDS="3")
            wait_until(lambda: held() == 1, 120, "the first worker to take a slot")
            assert client.get(f"/jobs/{job_id}").json()["progress"]["nodes_held"] == 1
            wait_until(lambda: held() == 0, 30, "the slot to be released after the timeout")
            assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
            workers.start(TRAINSERVE_GANG_SLOT_TIMEOUT_SECONDS="3")
            job = wait_for_job(client, workers, job_id, {"succeeded", "failed", "cancelled"}, timeout=600)
            assert held() == 0
        assert job["status"] == "succeeded", (job, workers.logs()[-3000:])
        assert "released slot" in workers.logs()
        assert job["info"]["nodes"] == 2 and job["info"]["world_size"] == 2
        assert [r["epoch"] for r in client.get(f"/jobs/{job_id}/metrics").json()["epochs"]] == [1, 2]
