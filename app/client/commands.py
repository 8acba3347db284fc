"""`trainserve submit / follow / jobs / logs / predict`: HTTP clients of the API, so they work remotely."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from app.client import render
from app.client.api import DEFAULT_URL, ApiError, TrainserveClient

EXIT_FAILED = 1  # the job failed or was cancelled
EXIT_USAGE = 2  # a bad spec file or option
EXIT_API = 3  # the server refused or could not be reached


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("TRAINSERVE_URL", DEFAULT_URL),
        help=f"the API's address (env TRAINSERVE_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TRAINSERVE_API_KEY"),
        help="sent as `Authorization: Bearer <key>` (env TRAINSERVE_API_KEY)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _client(args: argparse.Namespace) -> TrainserveClient:
    return TrainserveClient(args.url, args.api_key)


def _console() -> Console:
    return Console(highlight=False)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def load_spec(path: str, overrides: list[str]) -> dict[str, Any]:
    """A job spec from a YAML or JSON file (`-` for stdin), with `key=value` overrides (YAML values)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    spec = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a job spec is a mapping of options (dataset_id, model, epochs...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=5")
        spec[key.strip()] = yaml.safe_load(value)
    return spec


def follow(client: TrainserveClient, job_id: int, *, show_logs: bool, console: Console) -> int:
    """Follow a job until it ends: progress bar, epoch rows, final table. 0 when it succeeded."""
    with render.Follower(console, show_logs=show_logs) as follower:
        try:
            for event in client.events(job_id):
                follower.handle(event.event, event.data)
        except KeyboardInterrupt:
            follower.progress.stop()
            console.print(f"stopped following; job {job_id} goes on (`trainserve follow {job_id}` to resume)")
            return 130
    job = follower.job
    best = (job.get("best") or {}).get("epoch")
    if follower.rows:
        console.print(render.epoch_table(follower.rows, title=f"job {job_id}: epoch metrics", best=best))
    end = follower.end or {}
    status = end.get("status", job.get("status", "?"))
    reason = end.get("error") or end.get("stop_reason") or ""
    console.print(f"job {job_id} {render.status_text(status)}" + (f": {reason}" if reason else ""))
    return 0 if status == "succeeded" else EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    console = _console()
    try:
        spec = load_spec(args.spec, args.set or [])
    except (OSError, ValueError, yaml.YAMLError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    with _client(args) as client:
        job = client.submit(spec, idempotency_key=args.idempotency_key)
        if args.json and not args.follow:
            _print_json(job)
            return 0
        console.print(
            f"job {job['id']} {job['status']}: {job['spec']['model']} on dataset {job['dataset_id']}, "
            f"{job['spec']['epochs']} epochs  (dashboard: {client.url}/ui#/jobs/{job['id']})"
        )
        if not args.follow:
            return 0
        return follow(client, job["id"], show_logs=args.logs, console=console)


def cmd_follow(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return follow(client, args.job_id, show_logs=args.logs, console=_console())


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.jobs(status=args.status, limit=args.limit)
    if args.json:
        _print_json(jobs)
    elif not jobs:
        _console().print("no jobs")
    else:
        _console().print(render.jobs_table(jobs))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        lines = client.logs(args.job_id, args.limit)
    if args.json:
        _print_json(lines)
        return 0
    for line in lines:
        sys.stdout.write(
            f"{line['created_at'][:19].replace('T', ' ')} {line['level']:<7} {line['message']}\n"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    console = _console()
    results = []
    with _client(args) as client:
        for image in args.images:
            if not image.is_file():
                console.print(f"[red]error:[/] {image}: no such file")
                return EXIT_USAGE
            results.append({"file": str(image), **client.predict(args.job, image)})
    if args.json:
        _print_json(results)
        return 0
    for result in results:
        console.print(f"{result['file']}: [bold]{result['label']}[/] ({result['score']:.2%})")
        console.print(render.scores_table(result, args.top))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the client commands to the `trainserve` parser."""
    submit = sub.add_parser("submit", help="post a job spec (YAML or JSON); --follow shows it train")
    submit.add_argument("spec", help="a YAML or JSON file with the job spec, or - for stdin")
    submit.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override an option")
    submit.add_argument("--follow", "-f", action="store_true", help="follow the job until it ends")
    submit.add_argument("--logs", action="store_true", help="with --follow: print the worker's log lines")
    submit.add_argument("--idempotency-key", help="retrying with the same key never starts a second job")
    add_client_options(submit)
    submit.set_defaults(func=cmd_submit)

    follow_parser = sub.add_parser("follow", help="follow a job: progress bar, epoch rows, final table")
    follow_parser.add_argument("job_id", type=int)
    follow_parser.add_argument("--logs", action="store_true", help="print the worker's log lines too")
    add_client_options(follow_parser)
    follow_parser.set_defaults(func=cmd_follow)

    jobs = sub.add_parser("jobs", help="list jobs with status and progress")
    jobs.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--limit", type=int, default=50)
    add_client_options(jobs)
    jobs.set_defaults(func=cmd_jobs)

    logs = sub.add_parser("logs", help="a job's worker log lines, newest last")
    logs.add_argument("job_id", type=int)
    logs.add_argument("--limit", type=int, default=None)
    add_client_options(logs)
    logs.set_defaults(func=cmd_logs)

    predict = sub.add_parser("predict", help="class probabilities for images, from a job's best checkpoint")
    predict.add_argument("--job", type=int, required=True, help="the job whose checkpoint answers")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--top", type=int, default=5, help="classes to show per image")
    add_client_options(predict)
    predict.set_defaults(func=cmd_predict)


def run(args: argparse.Namespace) -> int:
    """Run a client command; server errors become one line on stderr and exit status 3."""
    try:
        return int(args.func(args))
    except ApiError as exc:
        Console(stderr=True, highlight=False).print(f"[red]error:[/] {exc}")
        return EXIT_API
