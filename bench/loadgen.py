"""A light closed-loop HTTP load generator: N keep-alive connections, each sending one request and
waiting for its answer before the next, over raw asyncio streams (uvloop when installed).

On a 2-core machine the client competes with the server for CPU, so it must cost little: requests are
prebuilt bytes, responses are parsed just enough (status, length) and checked for a `"label"` field.
It also samples the server's CPU time (the process and its children) over the measured window.

    python bench/loadgen.py --port 8000 --body body.bin --content-type '...' --clients 8 --seconds 10
prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (workers, API processes)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body, and whether the server keeps the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


async def client(
    host: str, port: int, request: bytes, start: float, measure_from: float, stop: float, tally: Tally
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            sent = time.perf_counter()
            if sent >= stop:
                return
            writer.write(request)
            try:
                status, body, keep = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                status, body, keep = 0, repr(exc).encode(), False
            done = time.perf_counter()
            # Counted by completion time: with batching, requests sent just before the window opens
            # complete inside it, and dropping them would undercount servers with long batches.
            if measure_from <= done <= stop:
                if status == 200 and b'"label"' in body:
                    tally.latencies.append(done - sent)
                else:
                    tally.errors += 1
                    if len(tally.error_samples) < 3:
                        tally.error_samples.append(f"{status}: {body[:200]!r}")
            if not keep:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def build_request(
    host: str, port: int, path: str, body: bytes, content_type: str, api_key: str | None
) -> bytes:
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{auth}\r\n"
    )
    return head.encode("latin-1") + body


async def run(args: argparse.Namespace) -> dict[str, object]:
    with open(args.body, "rb") as handle:
        body = handle.read()
    request = build_request(args.host, args.port, args.path, body, args.content_type, args.api_key)
    tally = Tally()
    start = time.perf_counter()
    measure_from = start + args.warmup
    stop = measure_from + args.seconds
    me = psutil.Process()

    async def window() -> tuple[float, float, float, float]:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        t0, c0, s0 = time.perf_counter(), sum(me.cpu_times()[:2]), tree_cpu_seconds(args.server_pid)
        await asyncio.sleep(max(0.0, stop - time.perf_counter()))
        return (
            time.perf_counter() - t0,
            sum(me.cpu_times()[:2]) - c0,
            tree_cpu_seconds(args.server_pid) - s0,
            0,
        )

    tasks = [
        asyncio.create_task(client(args.host, args.port, request, start, measure_from, stop, tally))
        for _ in range(args.clients)
    ]
    seconds, client_cpu, server_cpu, _ = await window()
    await asyncio.gather(*tasks)
    lat = sorted(tally.latencies)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None

    return {
        "clients": args.clients,
        "requests": len(lat),
        "rps": len(lat) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "client_cpu": client_cpu / seconds,  # cores busy on average
        "server_cpu": server_cpu / seconds,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--body", required=True, help="file holding the prebuilt request body")
    parser.add_argument("--content-type", required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--server-pid", type=int, required=True)
    args = parser.parse_args()
    try:
        from uvloop import new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        new_event_loop = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        print(json.dumps(runner.run(run(args))))


if __name__ == "__main__":
    main()
