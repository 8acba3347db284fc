"""Training throughput: the tutorial loop, a trainserve job, and the compute ceiling, on the same images.

Generates 60,000 28x28 grayscale PNGs in 10 classes (scikit-learn's digits, upsampled to 20x20, placed at
a random offset in a 28x28 frame as MNIST does, with a little noise) as real files in the ImageFolder
layout, then measures in one run, with the same `simple_cnn`, batch size and one epoch each:

  (a) the tutorial loop, written plainly: ImageFolder + Grayscale + ToTensor + Normalize, a DataLoader
      with num_workers=0, SGD: every image is decoded by PIL in every epoch;
  (b) a trainserve job through the real API (`trainserve api` and `trainserve worker` subprocesses over a
      temporary SQLite file; the images uploaded as one zip to POST /datasets/{id}/archive), default
      spec but batch_size and epochs=1, its images/s read from GET /jobs/{id}/metrics: first with a
      cold decoded-image cache (which times the cache build), then again with the cache warm (which times
      POST /jobs to the first finished batch, seen in GET /jobs/{id}'s progress);
  (c) the compute ceiling: the same model, the job's default optimiser (AdamW, fused) and the step format
      the job chose (memory layout and autocast dtype, from its `info`) stepping on normalised tensors
      already in memory, no data loading at all; and (c0) the same in the tutorial's plain format
      (contiguous fp32), to show how much of b/a is the step format and how much the data path;

and the worker's memory: its peak RSS during each job above the same process idle, sampled every 20 ms.
`--compile` adds a job with `"compile": true` and the compiled ceiling.

    .venv/bin/python bench/train_throughput.py                       # 60,000 images, CPU
    .venv/bin/python bench/train_throughput.py --images 6000         # a quick look
    .venv/bin/python bench/train_throughput.py --device cuda --model resnet18 --image-size 224 \
        --batch-size 256

On a GPU, the job's `info.data_placement` says whether the dataset stayed in GPU memory.
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
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
WORKER: subprocess.Popen[bytes] | None = None
sys.path.insert(0, str(ROOT))

from models.registry import build_model, get_model_info  # noqa: E402
from workers.engine import make_optimizer  # noqa: E402


def generate_images(root: Path, count: int, seed: int = 0) -> float:
    """`count` digit PNGs under root/<digit>/; returns the seconds it took."""
    started = time.perf_counter()
    digits = load_digits()
    upsampled = [
        np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR))
        for image in digits.images
    ]
    rng = np.random.default_rng(seed)
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    offsets = rng.integers(0, 9, size=(count, 2))
    for i in range(count):
        source = i % len(upsampled)
        frame = np.zeros((28, 28), dtype=np.float32)
        dy, dx = offsets[i]
        frame[dy : dy + 20, dx : dx + 20] = upsampled[source]
        frame += rng.normal(0, 6, size=frame.shape)
        pixels = np.clip(frame, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(root / str(digits.target[source]) / f"{i:05d}.png")
    return time.perf_counter() - started


def zip_folder(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for path in sorted(root.rglob("*.png")):
            archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def tutorial_loop(
    root: Path, *, model_name: str, batch_size: int, device: torch.device, image_size: int | None = None
) -> float:
    """(a) The tutorials' loop, as written in them; returns training images per second."""
    size = image_size or get_model_info(model_name).default_image_size
    transform = transforms.Compose(
        [
            transforms.Grayscale(),
            *([transforms.Resize(size)] if size != 28 else []),
            transforms.ToTensor(),
            transforms.Normalize((0.1307,), (0.3081,)),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=1, image_size=size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    seen = 0
    started = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def compute_ceiling(
    pixels: torch.Tensor,
    targets: torch.Tensor,
    *,
    model_name: str,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    autocast: torch.dtype | None,
    compile_model: bool = False,
) -> float:
    """(c) The same model, the job's default optimiser and the step format the job trained in (memory
    layout and autocast dtype, read from its `info`) on normalised tensors already in (device) memory:
    what the hardware can do with no data loading at all."""
    size = pixels.shape[-1]
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=1, image_size=size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, name="adamw", lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    inputs = ((pixels.float() / 255 - 0.5) / 0.5).to(device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    targets = targets.to(device)
    stepped = torch.compile(model) if compile_model else model
    model.train()

    def step(start: int) -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = criterion(
                stepped(inputs[start : start + batch_size]).float(), targets[start : start + batch_size]
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the job does on a GPU
    try:
        for start in range(0, 3 * batch_size, batch_size):  # warm-up (and compilation) is not timed
            step(start)
        if device.type == "cuda" and len(inputs) % batch_size:
            step(len(inputs) - len(inputs) % batch_size)  # cuDNN picks the last, smaller batch's kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(inputs), batch_size):
            step(start)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(inputs) / (time.perf_counter() - started)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in {"VmRSS", "VmHWM", "RssAnon", "RssFile"}:
            fields[name] = int(value.split()[0])
    return fields


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread; `peak()` is the largest seen since `reset()`.
    (VmHWM covers the whole process life: the cold job's cache build included.)"""

    def __init__(self, pid: int) -> None:
        self.pid, self.largest, self.largest_parts = pid, 0, {}
        self.stopped = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            try:
                fields = rss_kib(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            if fields["VmRSS"] > self.largest:
                self.largest, self.largest_parts = fields["VmRSS"], fields

    def reset(self) -> None:
        self.largest, self.largest_parts = 0, {}


def wait_for(
    client: httpx.Client, job_id: int, *, poll: float = 0.5, timeout: float = 3600
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if WORKER is not None and WORKER.poll() is not None:
            raise RuntimeError(f"the worker exited ({WORKER.returncode}); see processes.log")
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} did not finish")


def submit_to_first_batch(client: httpx.Client, spec: dict[str, Any]) -> tuple[int, float]:
    """POST /jobs, then poll GET /jobs/{id} every 10 ms until its progress shows a finished batch."""
    started = time.perf_counter()
    job_id = client.post("/jobs", json=spec).raise_for_status().json()["id"]
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        progress = job.get("progress") or {}
        if progress.get("phase") == "training" and (progress.get("batch") or 0) >= 1:
            return job_id, time.perf_counter() - started
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            raise RuntimeError(f"job {job_id} ended before a batch was seen: {job}")
        time.sleep(0.01)


def epoch_row(client: httpx.Client, job_id: int) -> dict[str, Any]:
    job = wait_for(client, job_id)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
    return {"job": job, "metrics": client.get(f"/jobs/{job_id}/metrics").json()["epochs"][0]}


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--image-size", type=int, help="input size of all three (default: the model's own)")
    parser.add_argument("--compile", action="store_true", help="also measure `compile: true`")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for all three (OMP_NUM_THREADS for the worker): on a machine shared with "
        "other work, 1 avoids OpenMP barriers waiting on descheduled threads",
    )
    args = parser.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the API and worker started below are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the API and worker processes
    python = sys.executable
    results: dict[str, Any] = {"images": args.images, "batch_size": args.batch_size, "model": args.model}
    print(
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; {load()}"
    )

    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        folder = Path(tmp) / "images"
        seconds = generate_images(folder, args.images)
        print(f"generated {args.images} PNGs in {seconds:.1f} s")

        database = f"sqlite:///{tmp}/bench.db"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")},
            "TRAINSERVE_DATABASE_URL": database,
            "TRAINSERVE_CACHE_DIR": f"{tmp}/cache",
            "TRAINSERVE_DEVICE": args.device,
            "TRAINSERVE_PORT": str(free_port()),
            "TRAINSERVE_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run([python, "-m", "app.cli", "migrate"], env=env, check=True, cwd=tmp)
        logs = open(Path(tmp) / "processes.log", "wb")  # noqa: SIM115
        api = subprocess.Popen([python, "-m", "app.cli", "api"], env=env, cwd=tmp, stdout=logs, stderr=logs)
        worker = subprocess.Popen([python, "-m", "workers"], env=env, cwd=tmp, stdout=logs, stderr=logs)
        global WORKER
        WORKER = worker
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{env['TRAINSERVE_PORT']}", timeout=600)
            for _ in range(600):
                try:
                    client.get("/health").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            dataset_id = client.post("/datasets", json={"name": "digits-60k"}).raise_for_status().json()["id"]
            archive = zip_folder(folder)
            started = time.perf_counter()
            added = (
                client.post(
                    f"/datasets/{dataset_id}/archive",
                    files={"file": ("digits.zip", archive, "application/zip")},
                )
                .raise_for_status()
                .json()
            )
            print(
                f"uploaded one {len(archive) / 1e6:.0f} MB zip: {added['added']} images in "
                f"{time.perf_counter() - started:.1f} s"
            )
            time.sleep(3)  # the worker has imported torch and is polling
            idle = rss_kib(worker.pid)
            sampler = PeakRss(worker.pid)

            # (a) now, next to (b) in time: the machine's load drifts.
            rate_a = tutorial_loop(
                folder,
                model_name=args.model,
                batch_size=args.batch_size,
                device=device,
                image_size=args.image_size,
            )
            print(f"(a) tutorial loop: {rate_a:,.0f} images/s   ({load()})")

            spec = {"dataset_id": dataset_id, "model": args.model, "batch_size": args.batch_size, "epochs": 1}
            if args.image_size:
                spec["image_size"] = args.image_size
            cold = epoch_row(client, client.post("/jobs", json=spec).raise_for_status().json()["id"])
            cache = cold["job"]["info"]["data_cache"]
            print(
                f"cold job: cache built in {cache['build_seconds']:.2f} s; epoch "
                f"{cold['metrics']['images_per_second']:,.0f} images/s   ({load()})"
            )
            # (c) on the very pixels the job trained on: the cache file, read into memory; measured just
            # before and just after (b), and averaged.
            (entry,) = (meta.parent for meta in Path(tmp, "cache", "decoded").glob("*/meta.json"))
            shape = json.loads((entry / "meta.json").read_text())["shape"]
            pixels = torch.from_numpy(np.fromfile(entry / "pixels.u8", dtype=np.uint8).reshape(shape))
            labels = torch.tensor(
                [int(label) for _, label in json.loads((entry / "images.json").read_text())]
            )
            info = cold["job"]["info"]
            precision = info["mixed_precision"]
            ceiling = {
                "model_name": args.model,
                "batch_size": args.batch_size,
                "device": device,
                "channels_last": info["channels_last"],
                "autocast": None if precision == "off" else getattr(torch, precision),
            }
            print(f"the job's step format: {info.get('step_format') or precision}")
            print(f"the job's data: {info.get('data_placement')} on {info.get('device')}")
            results.update(
                step_format=info.get("step_format"),
                device=info.get("device"),
                image_size=info.get("image_size"),
                data_placement=info.get("data_placement"),
                mixed_precision=precision,
                channels_last=info.get("channels_last"),
            )
            rate_c1 = compute_ceiling(pixels, labels, **ceiling)
            print(f"(c) compute ceiling, before (b): {rate_c1:,.0f} images/s   ({load()})")
            cold_peak = sampler.largest_parts
            sampler.reset()
            warm_id, first_batch = submit_to_first_batch(client, spec)
            warm = epoch_row(client, warm_id)
            assert warm["job"]["info"]["data_cache"]["hit"], warm["job"]["info"]
            peak = rss_kib(worker.pid)
            warm_peak = sampler.largest_parts
            sampler.stopped.set()
            rate_b = warm["metrics"]["images_per_second"]
            rate_c2 = compute_ceiling(pixels, labels, **ceiling)
            rate_c = (rate_c1 + rate_c2) / 2
            print(f"(c) compute ceiling, after (b): {rate_c2:,.0f} images/s   ({load()})")
            print(
                f"(b) trainserve job (warm cache): {rate_b:,.0f} images/s, data_seconds "
                f"{warm['metrics']['data_seconds']:.2f} of {warm['metrics']['seconds']:.1f} s; POST /jobs "
                f"to first batch {first_batch:.2f} s   ({load()})"
            )
            results.update(
                tutorial=rate_a,
                job=rate_b,
                job_cold=cold["metrics"]["images_per_second"],
                data_seconds=warm["metrics"]["data_seconds"],
                epoch_seconds=warm["metrics"]["seconds"],
                cache_build_seconds=cache["build_seconds"],
                submit_to_first_batch_seconds=first_batch,
                worker_idle_rss_mib=idle["VmRSS"] / 1024,
                worker_peak_rss_mib=peak["VmHWM"] / 1024,
                worker_peak_above_idle_mib=(peak["VmHWM"] - idle["VmRSS"]) / 1024,
                worker_rss_after_mib=peak["VmRSS"] / 1024,
                worker_warm_job_peak_above_idle_mib=(warm_peak["VmRSS"] - idle["VmRSS"]) / 1024,
                worker_cold_job_peak_above_idle_mib=(cold_peak["VmRSS"] - idle["VmRSS"]) / 1024,
            )
            for name, sample in (("cold job (cache build)", cold_peak), ("warm job", warm_peak)):
                print(
                    f"worker RSS during the {name}: peak {sample['VmRSS'] / 1024:.0f} MiB "
                    f"(+{(sample['VmRSS'] - idle['VmRSS']) / 1024:.0f} MiB above idle; anonymous "
                    f"+{(sample['RssAnon'] - idle['RssAnon']) / 1024:.0f} MiB, file-backed "
                    f"+{(sample['RssFile'] - idle['RssFile']) / 1024:.0f} MiB)"
                )
            print(
                f"worker RSS: idle {idle['VmRSS'] / 1024:.0f} MiB, peak {peak['VmHWM'] / 1024:.0f} MiB "
                f"(+{(peak['VmHWM'] - idle['VmRSS']) / 1024:.0f} MiB; now {peak['VmRSS'] / 1024:.0f} MiB, of "
                f"which file-backed {peak['RssFile'] / 1024:.0f} MiB)"
            )
            if args.compile:
                compiled = epoch_row(
                    client, client.post("/jobs", json={**spec, "compile": True}).json()["id"]
                )
                results["job_compiled"] = compiled["metrics"]["images_per_second"]
                print(
                    f"(b') job with compile: {results['job_compiled']:,.0f} images/s (compilation included)"
                )

        finally:
            for process in (worker, api):
                process.terminate()
            for process in (worker, api):
                process.wait(timeout=30)
            logs.close()

        results.update(ceiling=rate_c, ceiling_before=rate_c1, ceiling_after=rate_c2)
        # The tutorial's own step (contiguous fp32) with no data loading: how much of b/a is the step
        # format, and how much the data path.
        results["ceiling_plain_fp32"] = compute_ceiling(
            pixels, labels, **{**ceiling, "channels_last": False, "autocast": None}
        )
        print(f"(c0) ceiling in plain fp32, contiguous: {results['ceiling_plain_fp32']:,.0f} images/s")
        if args.compile:
            results["ceiling_compiled"] = compute_ceiling(pixels, labels, **ceiling, compile_model=True)
            print(f"(c') compiled ceiling: {results['ceiling_compiled']:,.0f} images/s")

    print()
    print("| (a) tutorial loop | (b) trainserve job | (c) compute ceiling | b/a | b/c |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {rate_a:,.0f} img/s | {rate_b:,.0f} img/s | {rate_c:,.0f} img/s | {rate_b / rate_a:.2f} | "
        f"{rate_b / rate_c:.2f} |"
    )
    results.update(b_over_a=rate_b / rate_a, b_over_c=rate_b / rate_c)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
