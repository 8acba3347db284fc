"""Prediction throughput: trainserve's POST /predict against a naive FastAPI server, LitServe, and the
model's own in-process ceiling, all serving the same checkpoint on this machine, in one run.

The checkpoints are trained for real through the service and the worker (in-process, a temporary SQLite
database): `simple_cnn` on 300 of scikit-learn's digits at 28x28 grayscale for 2 epochs, `resnet18` on
30 of them at 224x224 RGB for 1 epoch (serving speed does not depend on how good the weights are). Every
server is its own process, and so is the load generator (bench/loadgen.py): the CPU of each is measured
apart. Each request is one image already at the model's input size (a PNG digit-sized noise image for
simple_cnn, a 224x224 JPEG for resnet18), so no server spends time resizing.

    .venv/bin/python bench/predict_throughput.py                       # everything (about 15 minutes)
    .venv/bin/python bench/predict_throughput.py --models simple_cnn --clients 1,8 --seconds 2 \
        --servers trainserve,naive                                      # a quick subset
    .venv/bin/python bench/predict_throughput.py --device cuda --models resnet18 --clients 1,32 \
        --servers trainserve,litserve-gpu,ceiling --ceiling-batches 1,8,32  # on a GPU

With `--device cuda` every server and the ceiling run the model on the GPU (the checkpoint is still
trained on the CPU); `litserve-gpu` is LitServe's production example for GPUs (accelerator cuda, 4
workers, 4 API servers, batches of 8, ZeroMQ queues), and the ceiling is one pass at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.predictor import Predictor  # noqa: E402
from models.preprocessing import decode_image, to_uint8  # noqa: E402

# What each model is trained on and asked about: (job spec beyond the defaults, request image).
MODELS: dict[str, dict[str, Any]] = {
    "simple_cnn": {"spec": {"epochs": 2}, "per_class": 30, "size": 28, "mode": "L", "format": "PNG"},
    "resnet18": {
        "spec": {"epochs": 1, "image_size": 224, "channels": 3},
        "per_class": 3,  # training at 224 px on a CPU is slow; serving does not care how good the weights are
        "size": 224,
        "mode": "RGB",
        "format": "JPEG",
    },
}

# Server variants: how each is started. LitServe "best" is the best setup found on this 2-core machine.
LITSERVE = {
    "litserve-default": ["--max-batch", "32", "--batch-timeout", "0.005"],
    "litserve-best": ["--max-batch", "8", "--batch-timeout", "0.005", "--workers", "2", "--threads", "1",
                      "--api-servers", "2"],
    "litserve-gpu": ["--accelerator", "cuda", "--max-batch", "8", "--batch-timeout", "0.005",
                     "--workers", "4", "--threads", "4", "--api-servers", "4", "--fast-queue"],
}  # fmt: skip
GPU_ONLY = {"litserve-gpu"}  # left out of the default --servers
# trainserve as recommended for this machine (one API process per core, the kernel spreading connections
# between them; one forward pass at a time per model and process) and with every default.
TRAINSERVE = {
    "trainserve": {"TRAINSERVE_API_PROCESSES": "2", "TRAINSERVE_PREDICT_CONCURRENCY": "1"},
    "trainserve-1proc": {},
}
SERVERS = [*TRAINSERVE, "naive", *LITSERVE, "ceiling"]


@dataclass
class Prepared:
    database_url: str
    job_ids: dict[str, int]
    checkpoints: dict[str, Path]


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


def prepare(tmp: Path, models: list[str]) -> Prepared:
    """Train one job per model through the API and the real worker loop; keep the best checkpoints."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app
    from migrations import upgrade_to_head
    from workers.loop import serve

    url = f"sqlite:///{tmp / 'bench.db'}"
    upgrade_to_head(url)
    # In-process TestClient: its requests carry `Host: testserver`.
    settings = Settings(database_url=url, device="cpu", worker_poll_seconds=0.1, allowed_hosts=["testserver"])
    job_ids, checkpoints = {}, {}
    with TestClient(create_app(settings)) as client:
        by_label: dict[str, list[bytes]] = {}
        for label, data in digits_png():
            by_label.setdefault(label, []).append(data)
        for name in models:
            dataset_id = client.post("/datasets", json={"name": f"digits for {name}"}).json()["id"]
            for label, files in sorted(by_label.items()):
                chosen = files[: MODELS[name]["per_class"]]
                upload = [("files", (f"{label}-{i}.png", data, "image/png")) for i, data in enumerate(chosen)]
                response = client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=upload)
                response.raise_for_status()
            spec = {"dataset_id": dataset_id, "model": name, **MODELS[name]["spec"]}
            job = client.post("/jobs", json=spec).json()
            started = time.perf_counter()
            serve(settings, once=True)
            done = client.get(f"/jobs/{job['id']}").json()
            if done["status"] != "succeeded":
                raise RuntimeError(f"training {name} failed: {done['error']}")
            print(f"trained {name}: job {job['id']}, best epoch {done['best']['epoch']}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
            path = tmp / f"{name}.safetensors"
            path.write_bytes(client.get(f"/jobs/{job['id']}/checkpoint").content)
            job_ids[name], checkpoints[name] = job["id"], path
    from app.db.session import dispose_engines

    dispose_engines()
    return Prepared(url, job_ids, checkpoints)


def request_image(name: str) -> bytes:
    """A digit drawn at the model's input size: the resize step is then a no-op for every server."""
    cfg = MODELS[name]
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(cfg["size"], cfg["size"], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB").convert(cfg["mode"])
    buffer = io.BytesIO()
    image.save(buffer, cfg["format"], **({"quality": 90} if cfg["format"] == "JPEG" else {}))
    return buffer.getvalue()


def multipart(job_id: int, image: bytes, filename: str) -> tuple[bytes, str]:
    boundary = "trainservebenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="job_id"\r\n\r\n{job_id}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@contextmanager
def running(argv: list[str], env: dict[str, str], port: int, body: bytes, content_type: str) -> Iterator[int]:
    """Start a server process and wait until it answers a real prediction; stop it afterwards."""
    process = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {argv}")
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/predict",
                    content=body,
                    headers={"Content-Type": content_type, **auth_header(env)},
                    timeout=30,
                )
                if response.status_code == 200:
                    break
                raise RuntimeError(f"server answered {response.status_code}: {response.text[:300]}")
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {argv}") from None
                time.sleep(0.3)
        yield process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        # Whatever is left in the group: LitServe's inference workers may outlive their parent.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def auth_header(env: dict[str, str]) -> dict[str, str]:
    key = env.get("TRAINSERVE_API_KEYS", "").split(",")[0]
    return {"Authorization": f"Bearer {key}"} if key else {}


def load(port: int, pid: int, body_path: Path, content_type: str, clients: int, args: argparse.Namespace,
         api_key: str | None) -> dict[str, Any]:  # fmt: skip
    argv = [
        sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--body", str(body_path),
        "--content-type", content_type, "--clients", str(clients), "--seconds", str(args.seconds),
        "--warmup", str(args.warmup), "--server-pid", str(pid),
    ]  # fmt: skip
    if api_key:
        argv += ["--api-key", api_key]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=child_env({}))
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def ceiling(
    checkpoint: Path,
    name: str,
    seconds: float,
    *,
    device: str = "cpu",
    batches: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
) -> dict[str, Any]:
    """The model alone, no HTTP, no decode: img/s on preprocessed tensors at each batch size, in both
    memory layouts, run as one pass using every core or as one single-thread pass per core side by side
    (what a multi-process server does; on a GPU, one pass at a time). The best of them is the ceiling."""
    predictor = Predictor(checkpoint.read_bytes(), device=device, serialize=False)
    tensor = to_uint8(decode_image(request_image(name)), predictor.preprocessing)
    cores = len(os.sched_getaffinity(0))
    best: dict[str, Any] = {"img_per_s": 0.0}
    per_setup: dict[str, float] = {}
    for channels_last in (False, True):
        predictor.set_channels_last(channels_last)
        for passes in sorted({1, cores}) if predictor.device.type == "cpu" else [1]:
            for batch in batches:
                rate = _parallel_rate(predictor, [tensor] * batch, passes, max(1, cores // passes), seconds)
                setup = f"{'channels_last' if channels_last else 'contiguous'}, {passes} x batch {batch}"
                per_setup[setup] = rate
                if rate > best["img_per_s"]:
                    best = {"img_per_s": rate, "batch": batch, "setup": setup}
    return {**best, "per_setup": per_setup}


def _parallel_rate(
    predictor: Predictor, tensors: list[torch.Tensor], passes: int, threads: int, seconds: float
) -> float:
    counts = [0] * passes
    stop_at = time.perf_counter() + seconds

    def run(index: int) -> None:
        torch.set_num_threads(threads)  # per calling thread (OpenMP)
        predictor.probabilities_of(tensors)  # warm-up
        while time.perf_counter() < stop_at:
            predictor.probabilities_of(tensors)
            counts[index] += len(tensors)

    started = time.perf_counter()
    runners = [threading.Thread(target=run, args=(i,)) for i in range(passes)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    return sum(counts) / (time.perf_counter() - started)


def server_argv(server: str, checkpoint: Path, port: int, device: str = "cpu") -> list[str]:
    if server in TRAINSERVE:
        return [sys.executable, "-m", "app.cli", "api", "--port", str(port)]
    base = [sys.executable, str(ROOT / "bench" / "baselines.py")]
    if server == "naive":
        return [*base, "naive", "--checkpoint", str(checkpoint), "--port", str(port), "--device", device]
    return [*base, "litserve", "--checkpoint", str(checkpoint), "--port", str(port), *LITSERVE[server]]


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: simple_cnn,resnet18")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument(
        "--servers",
        default=",".join(s for s in SERVERS if s not in GPU_ONLY),
        help=f"comma-separated of {SERVERS}",
    )
    parser.add_argument("--device", default="cpu", help="where every server and the ceiling run the model")
    parser.add_argument(
        "--ceiling-batches", default="1,4,8,16,32,64", help="batch sizes the ceiling tries, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument(
        "--api-key", default="bench-key", help="trainserve runs with this API key ('' for none)"
    )
    parser.add_argument(
        "--trainserve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra TRAINSERVE_* settings",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server started below is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    models = [m for m in args.models.split(",") if m]
    servers = [s for s in args.servers.split(",") if s]
    clients = [int(c) for c in args.clients.split(",") if c]
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown: {unknown}")

    print(f"load before: {os.getloadavg()}, cpus: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepared = prepare(tmp, models)
        for name in models:
            image = request_image(name)
            body, content_type = multipart(
                prepared.job_ids[name], image, f"x.{MODELS[name]['format'].lower()}"
            )
            body_path = tmp / f"{name}.body"
            body_path.write_bytes(body)
            for server in servers:
                if server == "ceiling":
                    row = ceiling(
                        prepared.checkpoints[name],
                        name,
                        seconds=min(args.seconds, 2.0),
                        device=args.device,
                        batches=tuple(int(b) for b in args.ceiling_batches.split(",") if b),
                    )
                    results.append({"model": name, "server": server, **row})
                    print(f"{name} ceiling: {row['img_per_s']:,.0f} img/s ({row['setup']})", flush=True)
                    continue
                port = free_port()
                env = child_env({})
                api_key = None
                if server in TRAINSERVE:
                    env.update(TRAINSERVE_DATABASE_URL=prepared.database_url, TRAINSERVE_DEVICE=args.device,
                               TRAINSERVE_LOG_LEVEL="WARNING", **TRAINSERVE[server])  # fmt: skip
                    if args.api_key:
                        env["TRAINSERVE_API_KEYS"] = api_key = args.api_key
                    for item in args.trainserve_env:
                        key, _, value = item.partition("=")
                        env[key] = value
                argv = server_argv(server, prepared.checkpoints[name], port, args.device)
                with running(argv, env, port, body, content_type) as pid:
                    for n in clients:
                        row = load(port, pid, body_path, content_type, n, args, api_key)
                        results.append({"model": name, "server": server, **row})
                        print(
                            f"{name:10} {server:17} {n:3} clients: {row['rps']:8,.0f} req/s  "
                            f"p50 {fmt(row['p50_ms'])} ms  p99 {fmt(row['p99_ms'])} ms  "
                            f"errors {row['errors']}  cpu server {row['server_cpu']:.2f} "
                            f"client {row['client_cpu']:.2f}"
                            + (f"  {row['error_samples']}" if row["errors"] else ""),
                            flush=True,
                        )
    print(f"load after: {os.getloadavg()}")
    report(results, models, clients)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(results: list[dict[str, Any]], models: list[str], clients: list[int]) -> None:
    """A markdown table per model, with the ratios the targets are stated in."""

    def find(model: str, server: str, n: int | None = None) -> dict[str, Any] | None:
        for row in results:
            if row["model"] == model and row["server"] == server and (n is None or row.get("clients") == n):
                return row
        return None

    print("\n| model | clients | server | req/s | p50 ms | p99 ms | errors | server CPU | client CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in models:
        for n in clients:
            for server in SERVERS[:-1]:
                row = find(model, server, n)
                if row:
                    print(
                        f"| {model} | {n} | {server} | {row['rps']:,.0f} | {fmt(row['p50_ms'])} | "
                        f"{fmt(row['p99_ms'])} | {row['errors']} | {row['server_cpu']:.2f} | "
                        f"{row['client_cpu']:.2f} |"
                    )
        top = find(model, "ceiling")
        if top:
            label = f"ceiling (in-process, {top['setup']})"
            print(f"| {model} | - | {label} | {top['img_per_s']:,.0f} img/s | | | | | |")
    print()
    for model in models:
        ours = {n: find(model, "trainserve", n) or find(model, "trainserve-1proc", n) for n in clients}
        for n, row in ours.items():
            if row is None:
                continue
            ratios = []
            for server in ("naive", "litserve-default", "litserve-best", "litserve-gpu"):
                other = find(model, server, n)
                if other and other["rps"]:
                    ratios.append(f"{row['rps'] / other['rps']:.2f}x {server}")
            top = find(model, "ceiling")
            if top:
                ratios.append(f"{row['rps'] / top['img_per_s']:.2f}x ceiling")
            naive = find(model, "naive", n)
            if naive and row["p50_ms"] is not None and naive["p50_ms"] is not None:
                ratios.append(f"p50 {row['p50_ms'] - naive['p50_ms']:+.2f} ms vs naive")
            print(f"{model} @ {n} clients: trainserve = " + ", ".join(ratios))


if __name__ == "__main__":
    main()
