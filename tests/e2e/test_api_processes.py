"""`trainserve api` with several processes: the kernel spreads connections between them, a port that is
taken is refused with a clear message, and SIGTERM stops every process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.processes import reuseport_supported
from tests.e2e.processes import environment, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not reuseport_supported(), reason="SO_REUSEPORT balancing is Linux's"),
]


def start_api(database_url: str, port: int, log: Path, processes: int = 2) -> subprocess.Popen[bytes]:
    env = environment(database_url, TRAINSERVE_PORT=str(port), TRAINSERVE_API_PROCESSES=str(processes))
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api"], env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def serving_children(parent: subprocess.Popen[bytes], port: int, count: int) -> list[psutil.Process]:
    """The parent's children, once `count` of them listen on the port."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert parent.poll() is None, "the API exited"
        children = psutil.Process(parent.pid).children()
        listening = [
            child
            for child in children
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections())
        ]
        if len(listening) == count:
            return listening
        time.sleep(0.2)
    raise AssertionError("the API processes did not start listening")


def test_connections_are_spread_between_processes_and_sigterm_stops_them(
    sqlite_url: str, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "api.log"
    api = start_api(sqlite_url, port, log)
    try:
        children = serving_children(api, port, 2)
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) for _ in range(32)]
        for client in clients:  # 32 keep-alive connections, each opened by one request
            assert client.get("/health").status_code == 200
        per_child = [
            sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in child.net_connections())
            for child in children
        ]
        # uvicorn's shared socket let one process accept them all; hashed, both get some (all 32 in one
        # process would happen once in 2**31 runs).
        assert sum(per_child) == 32 and min(per_child) >= 1, per_child
        for client in clients:
            client.close()
    finally:
        api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=60) == 0, log.read_text()
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)


def test_a_port_in_use_is_refused_by_name(sqlite_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = start_api(sqlite_url, port, tmp_path / "api.log")
        assert api.wait(timeout=60) != 0
    assert f"cannot listen on 127.0.0.1:{port}" in (tmp_path / "api.log").read_text()


def test_processes_do_not_outlive_a_killed_parent(sqlite_url: str, tmp_path: Path) -> None:
    port = free_port()
    api = start_api(sqlite_url, port, tmp_path / "api.log")
    children = serving_children(api, port, 2)
    api.kill()  # SIGKILL: no chance to stop them itself
    api.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], "API processes outlived their parent"
