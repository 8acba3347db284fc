"""Load check of issue 21: does a crowd of open event streams slow predictions down, and does the API's
memory stay bounded? Loopback only, bounded in time and count.

1. Trains a small lenet on scikit-learn's digits (in-process worker loop), and queues `--jobs` more
   jobs that no worker runs (so their streams stay open).
2. Starts `trainserve api` (one process) with the stream caps raised to admit every stream, then:
   (a) `--clients` closed-loop /predict clients for `--seconds` (bench/loadgen.py): the baseline p99;
   (b) the same while `--streams` event streams are open (spread over the queued jobs);
   and reports both p99s, their ratio (target: at most 2) and the API's peak RSS.
3. Restarts the API with the default caps and opens the same streams from 25 loopback addresses,
   counting how many are admitted and how many refused (429 per client, 503 in all).

    python bench/event_streams_load.py [--streams 500] [--clients 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def digits_png() -> list[tuple[str, bytes]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    out = []
    for array, target in zip(data.images, data.target, strict=True):
        buffer = io.BytesIO()
        Image.fromarray((array * 255 / 16).astype(np.uint8), "L").save(buffer, "PNG")
        out.append((str(int(target)), buffer.getvalue()))
    return out


def prepare(database_url: str, queued: int) -> tuple[int, list[int], bytes]:
    """A trained job (its id), `queued` jobs left queued, and one digit image to predict."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.db.session import dispose_engines
    from app.main import create_app
    from migrations import upgrade_to_head
    from workers.loop import serve

    upgrade_to_head(database_url)
    settings = Settings(
        database_url=database_url, device="cpu", worker_poll_seconds=0.1, allowed_hosts=["testserver"]
    )
    samples = digits_png()
    with TestClient(create_app(settings)) as client:
        dataset = client.post("/datasets", json={"name": "digits"}).json()["id"]
        by_label: dict[str, list[bytes]] = {}
        for label, data in samples[:-1]:
            by_label.setdefault(label, []).append(data)
        for label, files in sorted(by_label.items()):
            upload = [("files", (f"{label}-{i}.png", data, "image/png")) for i, data in enumerate(files[:80])]
            client.post(f"/datasets/{dataset}/images", data={"label": label}, files=upload).raise_for_status()
        trained = client.post("/jobs", json={"dataset_id": dataset, "model": "lenet", "epochs": 2}).json()[
            "id"
        ]
        serve(settings, once=True)
        assert client.get(f"/jobs/{trained}").json()["status"] == "succeeded"
        waiting = [
            client.post("/jobs", json={"dataset_id": dataset, "model": "lenet"}).json()["id"]
            for _ in range(queued)
        ]
    dispose_engines()
    return trained, waiting, samples[-1][1]


@contextlib.contextmanager
def api(database_url: str, port: int, log: Path, **settings: str) -> Iterator[psutil.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    env.update(
        {"TRAINSERVE_DATABASE_URL": database_url, "TRAINSERVE_PORT": str(port), "TRAINSERVE_DEVICE": "cpu"}
    )
    env.update(settings)
    env["TRAINSERVE_LOG_LEVEL"] = "WARNING"  # no access log: 20 clients would write thousands of lines
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api"],
            env=env,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {log}") from None
            time.sleep(0.2)
    try:
        yield psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def multipart(job_id: int, image: bytes) -> tuple[bytes, str]:
    boundary = "benchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="job_id"\r\n\r\n{job_id}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def predict_load(
    port: int, pid: int, body_file: Path, content_type: str, args: argparse.Namespace
) -> dict[str, float]:
    command = [
        sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--body", str(body_file),
        "--content-type", content_type, "--clients", str(args.clients), "--seconds", str(args.seconds),
        "--warmup", "3", "--server-pid", str(pid),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


class Streams:
    """`count` event streams held open (and read) from a thread of their own, over loopback addresses."""

    def __init__(self, port: int, jobs: list[int], count: int, addresses: int) -> None:
        self.port, self.jobs, self.count, self.addresses = port, jobs, count, addresses
        self.statuses: Counter[int] = Counter()
        self.open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, index: int) -> None:
        local = (f"127.0.0.{1 + index % self.addresses}", 0)
        job = self.jobs[index % len(self.jobs)]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=local)
        except OSError:
            self.statuses[-1] += 1
            return
        writer.write(f"GET /jobs/{job}/events HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
        try:
            status = int((await reader.readline()).split()[1])
        except (IndexError, ValueError, ConnectionError):
            status = 0
        self.statuses[status] += 1
        if status == 200:
            self.open += 1
            with contextlib.suppress(ConnectionError):
                while not self._stop.is_set() and await reader.read(65536):
                    pass
            self.open -= 1
        writer.close()

    async def _main(self) -> None:
        tasks = []
        for index in range(self.count):
            tasks.append(asyncio.create_task(self._one(index)))
            if index % 50 == 49:
                await asyncio.sleep(0.05)  # a crowd arriving, not one burst
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Streams:
        self._thread.start()
        deadline = time.monotonic() + 60
        while sum(self.statuses.values()) < self.count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def peak_rss(process: psutil.Process, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append(process.memory_info().rss)
        time.sleep(0.1)


def measured(process: psutil.Process, run: Callable[[], dict[str, float]]) -> tuple[dict[str, float], int]:
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(process, stop, samples))
    sampler.start()
    try:
        result = run()
    finally:
        stop.set()
        sampler.join()
    return result, max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--jobs", type=int, default=50, help="queued jobs the streams follow")
    parser.add_argument("--log", default="var/event_streams_load.log", help="the API's output")
    args = parser.parse_args()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; loopback only",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        database_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        trained, waiting, image = prepare(database_url, args.jobs)
        body, content_type = multipart(trained, image)
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(body)
        port = free_port()
        admit_all = {
            "TRAINSERVE_EVENTS_MAX_STREAMS": str(args.streams),
            "TRAINSERVE_EVENTS_MAX_STREAMS_PER_CLIENT": str(args.streams),
        }
        log = Path(args.log)
        with api(database_url, port, log, **admit_all) as process:
            idle_rss = process.memory_info().rss
            alone, alone_rss = measured(
                process, lambda: predict_load(port, process.pid, body_file, content_type, args)
            )
            with Streams(port, waiting, args.streams, addresses=1) as streams:
                opened = streams.open
                crowded, crowded_rss = measured(
                    process, lambda: predict_load(port, process.pid, body_file, content_type, args)
                )
                still_open = streams.open
        port = free_port()
        with (
            api(database_url, port, log) as process,
            Streams(port, waiting, args.streams, addresses=25) as capped,
        ):
            refused = dict(capped.statuses)
            capped_rss = process.memory_info().rss
    ratio = crowded["p99_ms"] / alone["p99_ms"]
    mib = 2**20
    print(json.dumps({"alone": alone, "with_streams": crowded}, indent=1))
    print(f"\n{args.clients} predict clients, {args.seconds:.0f} s each:")
    print(f"  alone: p50 {alone['p50_ms']:.1f} ms, p99 {alone['p99_ms']:.1f} ms, {alone['rps']:.0f} req/s")
    print(
        f"  with {opened} streams open ({still_open} at the end): p50 {crowded['p50_ms']:.1f} ms, "
        f"p99 {crowded['p99_ms']:.1f} ms, {crowded['rps']:.0f} req/s"
    )
    print(f"  p99 ratio (with / without streams): {ratio:.2f} (target <= 2)")
    print(
        f"  API RSS: idle {idle_rss / mib:.0f} MiB, peak alone {alone_rss / mib:.0f} MiB, "
        f"peak with streams {crowded_rss / mib:.0f} MiB"
    )
    print(
        f"default caps, {args.streams} streams from 25 addresses: statuses {refused}, "
        f"RSS {capped_rss / mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
