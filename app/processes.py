"""Serve the API from several processes on one port, with the kernel spreading connections evenly.

uvicorn's `workers=N` shares one listening socket, and the process that wakes first accepts every
connection waiting (asyncio accepts in a loop), so a burst of keep-alive clients can all land in one
process while the others idle: 32 benchmark clients on 2 processes gave resnet18 21 req/s with one
core idle. Here each process listens on a socket of its own with SO_REUSEPORT (Linux), and the kernel
hashes each new connection to one of them. Elsewhere uvicorn's own workers are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

log = logging.getLogger("trainserve")

BACKLOG = 2048  # uvicorn's default
CRASH_LOOP_SECONDS = 10.0  # a process that dies this soon after starting is not restarted


def reuseport_supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program (or another trainserve) holds: SO_REUSEPORT alone would let a
    second server of the same user share the port and silently take half the connections."""
    try:
        _socket(host, port, reuse_port=False).close()
    except OSError as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def die_with_parent(parent: int) -> None:
    """In a child of `parent` (Linux): if the parent is killed outright (SIGKILL, OOM), the kernel sends
    this process SIGTERM, so no child is left running on its own."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def serve_one(options: dict[str, Any], parent: int) -> None:
    """One API process (the target of a spawned child): its own SO_REUSEPORT socket, then uvicorn."""
    import uvicorn

    die_with_parent(parent)
    sock = _socket(options["host"], options["port"], reuse_port=True)
    sock.listen(BACKLOG)
    config = uvicorn.Config("app.main:create_app", factory=True, **options)
    uvicorn.Server(config).run(sockets=[sock])


def serve_processes(options: dict[str, Any], processes: int) -> int:
    """Run `processes` API processes until SIGINT/SIGTERM; a process that dies is restarted unless it
    died while starting (a bad setting would only die again). Returns the exit code."""
    check_port_free(options["host"], options["port"])
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no torch state forked

    def start() -> tuple[BaseProcess, float]:
        child = context.Process(target=serve_one, args=(options, os.getpid()), name="trainserve-api")
        child.start()
        return child, time.monotonic()

    children = [start() for _ in range(processes)]
    log.info(
        "API on http://%s:%s: %d processes %s, connections spread by the kernel (SO_REUSEPORT)",
        options["host"],
        options["port"],
        processes,
        [child.pid for child, _ in children],
    )
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        # One SIGTERM each. A terminal's Ctrl-C has reached them too (same process group), and uvicorn
        # only cuts its graceful shutdown short on a second SIGINT, never on a SIGTERM.
        nonlocal stopping
        if stopping:
            return
        stopping = True
        for child, _ in children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # it exited a moment ago
                    os.kill(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        while True:
            for index, (child, started) in enumerate(children):
                if child.is_alive() or stopping:
                    continue
                if time.monotonic() - started < CRASH_LOOP_SECONDS:
                    log.error(
                        "API process %s exited with %s while starting; stopping", child.pid, child.exitcode
                    )
                    exit_code = 1
                    stop(signal.SIGTERM, None)
                    break
                log.warning("API process %s exited with %s; starting another", child.pid, child.exitcode)
                children[index] = start()
            if stopping and not any(child.is_alive() for child, _ in children):
                break
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code
