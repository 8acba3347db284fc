"""Real trainserve processes for the end-to-end tests: `trainserve up` and lone workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CACHE_DIR_ENV = "TRAINSERVE_CACHE_DIR"  # set per test by tests/conftest.py
FAST_POLLING = {"TRAINSERVE_WORKER_POLL_SECONDS": "0.2", "TRAINSERVE_PROGRESS_INTERVAL_SECONDS": "0.2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(database_url: str, **settings: str) -> dict[str, str]:
    """The test runner's environment without its TRAINSERVE_* settings (but the test's own cache
    directory), plus the given ones."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_") or k == CACHE_DIR_ENV},
        "TRAINSERVE_DATABASE_URL": database_url,
        "TRAINSERVE_DEVICE": "cpu",
        **FAST_POLLING,
        **settings,
    }


def start_worker(database_url: str, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "workers"],
            env=environment(database_url, **settings),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def trainserve_up(
    database_url: str, log: Path, *, workers: int = 1, **settings: str
) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    """`trainserve up` on a free port, yielding once `/health` answers; stopped with SIGTERM after.
    `settings` are extra TRAINSERVE_* variables (e.g. TRAINSERVE_API_KEYS="k")."""
    port = free_port()
    env = environment(database_url, TRAINSERVE_PORT=str(port), TRAINSERVE_WORKERS=str(workers), **settings)
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up"], env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.monotonic() + 120  # a loaded 2-core CI machine starts torch slowly
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"trainserve up did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield client, process
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()  # `up` passes SIGTERM on to the API and the workers and waits for them
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()  # the children get SIGTERM from the kernel when `up` dies
                process.wait()
