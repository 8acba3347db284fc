"""`trainserve` command line: `up` (everything), `api`, `worker`, `migrate`; and the HTTP client commands
`submit`, `follow`, `jobs`, `logs`, `predict` (app.client), which work against any server (`--url`).

`up` runs the API and the workers as child processes (the API never imports the worker code), passes
Ctrl-C/SIGTERM on to them and waits until they have all exited.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from app.core.config import get_settings
from app.core.logging import configure_logging
from app.processes import die_with_parent

log = logging.getLogger("trainserve")


def cmd_migrate(_args: argparse.Namespace) -> int:
    from migrations import upgrade_to_head

    settings = get_settings()
    upgrade_to_head(settings.database_url)
    log.info("database is at the latest schema (%s)", settings.database_url.split("@")[-1])
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from app.api.slow_clients import HeaderTimeoutProtocol
    from app.main import create_app

    settings = get_settings()
    options = {
        "host": args.host or settings.host,
        "port": args.port or settings.port,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": 5,
        "http": HeaderTimeoutProtocol,  # a request head must arrive within header_read_timeout_seconds
    }
    if settings.api_processes > 1:
        # Each process builds its app (and model cache) from the same TRAINSERVE_* environment, so
        # settings and API keys are identical in all of them.
        from app.processes import reuseport_supported, serve_processes

        if reuseport_supported():
            return serve_processes(options, settings.api_processes)
        uvicorn.run("app.main:create_app", factory=True, workers=settings.api_processes, **options)
    else:
        uvicorn.run(create_app(settings), **options)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # The worker is its own program (`python -m workers`): the app package never imports it.
    argv = [sys.executable, "-m", "workers", *(["--once"] if args.once else [])]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover - execv does not return


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    # A process group of its own: Ctrl-C in a terminal reaches only `up`, which then sends each
    # child exactly one SIGTERM (a second signal would make a worker skip its graceful requeue).
    return subprocess.Popen(
        [sys.executable, *argv],
        process_group=0,
        # If `up` itself is killed (SIGKILL, OOM), the kernel sends the child SIGTERM, so no API or
        # worker is ever left running on its own.
        preexec_fn=functools.partial(die_with_parent, os.getpid()) if sys.platform == "linux" else None,
    )


def cmd_up(args: argparse.Namespace) -> int:
    settings = get_settings()
    if cmd_migrate(args) != 0:
        return 1
    workers = settings.workers if args.workers is None else args.workers
    api_argv = ["-m", "app.cli", "api"]
    if args.host:
        api_argv += ["--host", args.host]
    if args.port:
        api_argv += ["--port", str(args.port)]
    api = _spawn(api_argv)
    worker_procs = [_spawn(["-m", "workers"]) for _ in range(workers)]
    log.info(
        "trainserve up: API on http://%s:%s (pid %d), %d worker(s) %s",
        args.host or settings.host,
        args.port or settings.port,
        api.pid,
        workers,
        [p.pid for p in worker_procs],
    )

    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("trainserve up: signal %d, stopping the API and the workers", signum)
        for proc in [api, *worker_procs]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    exit_code = 0
    while True:
        if api.poll() is not None and not stopping:
            log.error("trainserve up: the API exited with %s; stopping", api.returncode)
            exit_code = 1
            stop(signal.SIGTERM, None)
        for index, proc in enumerate(worker_procs):
            if proc.poll() is not None and not stopping:
                log.warning(
                    "trainserve up: worker %d exited with %s; restarting it", proc.pid, proc.returncode
                )
                worker_procs[index] = _spawn(["-m", "workers"])
        if stopping and all(p.poll() is not None for p in [api, *worker_procs]):
            break
        time.sleep(0.2)
    log.info("trainserve up: stopped")
    return exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="migrate, then run the API and the workers until Ctrl-C")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--workers", type=int, default=None, help="default: TRAINSERVE_WORKERS")
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run one training worker")
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    migrate.set_defaults(func=cmd_migrate)

    from app.client import commands as client_commands

    client_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func.__module__ == "app.client.commands":
        from app.client.commands import run

        return run(args)
    configure_logging(get_settings().log_level)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
