"""Data-parallel scaling: training throughput of one process against N processes (DDP), same code path
as a distributed job (workers.distributed: elastic launch, DistributedSampler shards, DDP, the per-batch
stop agreement, reduced metrics).

CPU (always): `simple_cnn` on scikit-learn's digits, decoded once to 28 px uint8 tensors (the cached
digits), batch 32 per process, gloo; 1 process with every core against N processes with cores/N threads.
GPU (only where CUDA GPUs are visible): `resnet18` at 224 px, batch 256 per GPU, nccl; 1 GPU against all
visible GPUs. Prints images/s and the scaling efficiency, throughput(N) / (N x throughput(1)).

    .venv/bin/python bench/train_scaling.py                 # CPU: 1 vs 2 processes (+ GPUs if any)
    .venv/bin/python bench/train_scaling.py --processes 4 --epochs 5
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from app.schemas.jobs import JobSpec
from models.preprocessing import Preprocessing, decode_image, to_uint8
from models.registry import build_model
from workers.distributed import Distributed, World
from workers.engine import make_optimizer, train_one_epoch


@dataclass(frozen=True)
class Case:
    model: str
    image_size: int
    batch_size: int  # per process
    device: str  # cpu or cuda
    epochs: int
    repeat: int  # the digits, repeated: enough batches per epoch for a steady rate


def cached_digits(image_size: int, repeat: int) -> tuple[torch.Tensor, torch.Tensor, Preprocessing]:
    """The digits as PNG bytes, decoded once through the service's own preprocessing."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    preprocessing = Preprocessing(image_size=image_size, channels=1, mean=(0.5,), std=(0.5,))
    tensors = []
    for array in data.images:
        buffer = io.BytesIO()
        Image.fromarray((array * 255 / 16).astype("uint8"), "L").save(buffer, "PNG")
        tensors.append(to_uint8(decode_image(buffer.getvalue()), preprocessing))
    images = torch.stack(tensors).repeat(repeat, 1, 1, 1)
    targets = torch.tensor(data.target, dtype=torch.long).repeat(repeat)
    return images, targets, preprocessing


def run_epochs(case: Case, *, dist: Distributed | None) -> list[float]:
    """Images per second of each epoch after a warm-up epoch (the whole world's images)."""
    device = dist.device if dist is not None else torch.device(case.device)
    images, targets, preprocessing = cached_digits(case.image_size, case.repeat)
    torch.manual_seed(0)
    model = build_model(case.model, num_classes=10, in_channels=1, image_size=case.image_size).to(device)
    trained = dist.wrap(model) if dist is not None else model
    optimizer = make_optimizer(model, name="adamw", lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    everything = torch.arange(len(targets))
    rates = []
    for epoch in range(case.epochs + 1):
        generator = torch.Generator().manual_seed(epoch)
        indices = everything
        if dist is not None:
            indices, generator = dist.epoch_shard(everything, epoch)

        def on_batch(_batch: int, _batches: int) -> None:
            if dist is not None:
                dist.agree_stop(0)  # what every batch of a distributed job does

        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = train_one_epoch(
            trained,
            criterion,
            optimizer,
            images,
            targets,
            indices,
            batch_size=case.batch_size,
            preprocessing=preprocessing,
            device=device,
            generator=generator,
            augment=None,
            on_batch=on_batch,
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if dist is not None:
            result = dist.reduce_train(result)
            seconds = result.seconds
        if epoch > 0:  # the first epoch warms up (allocations, cudnn autotuning, DDP buckets)
            rates.append(result.samples / seconds)
    return rates


def bench_rank(case: Case, stop_dir: str) -> list[float]:
    """One rank of the N-process run (started by elastic_launch)."""
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    backend = "nccl" if case.device == "cuda" else "gloo"
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch_dist.init_process_group(backend)
    try:
        spec = JobSpec(dataset_id=0, model=case.model, batch_size=case.batch_size, seed=0)
        world = World(nodes=1, devices=devices, backend=backend, device=case.device)
        dist = Distributed(spec=spec, world=world, stop_path=Path(stop_dir) / "stop")
        return run_epochs(case, dist=dist)
    finally:
        torch_dist.destroy_process_group()


def run_world(case: Case, processes: int) -> float:
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as run_dir:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=processes,
            run_id=f"bench-{processes}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            rdzv_configs={"is_host": True},
            max_restarts=0,
            monitor_interval=0.2,
            start_method="spawn",
            local_addr="127.0.0.1",
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(run_dir) / "elastic")),
        )
        results = elastic_launch(config, bench_rank)(case, run_dir)
    return statistics.median(results[0])


def report(title: str, case: Case, processes: int) -> None:
    unit = "GPU" if case.device == "cuda" else "process"
    rows = []
    if case.device == "cpu":
        # On the CPU a "device" is a process with its share of the cores: efficiency compares N of them
        # with one such process. A single-process job uses every core, so that row is shown too.
        cores = os.cpu_count() or 1
        torch.set_num_threads(cores)
        whole = statistics.median(run_epochs(case, dist=None))
        rows.append(f"| 1 process, {cores} threads (a `devices: 1` job) | {whole:,.0f} | | |")
        torch.set_num_threads(max(1, cores // processes))
    one = statistics.median(run_epochs(case, dist=None))
    many = run_world(case, processes)
    efficiency = many / (processes * one)
    print(f"\n{title}: {case.model}, {case.image_size} px, batch {case.batch_size} per {unit}")
    print(
        f"| {'GPUs' if case.device == 'cuda' else 'processes'} | images/s | speed-up | scaling efficiency |"
    )
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(row)
    threads = f", {torch.get_num_threads()} thread(s) each" if case.device == "cpu" else ""
    print(f"| 1{threads} | {one:,.0f} | 1.00x | 100% |")
    print(f"| {processes}{threads} | {many:,.0f} | {many / one:.2f}x | {efficiency:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="CPU processes to compare with one")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up)")
    parser.add_argument("--repeat", type=int, default=2, help="the digits, this many times per epoch (CPU)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU part even where GPUs exist")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")

    cpu = Case("simple_cnn", 28, 32, "cpu", args.epochs, args.repeat)
    report("CPU (gloo)", cpu, args.processes)

    gpus = torch.cuda.device_count()
    if gpus and not args.no_gpu:
        # 20 batches of 256 per GPU per epoch: a steady rate without a big dataset.
        repeat = max(1, (20 * 256 * gpus) // 1797 + 1)
        gpu = Case("resnet18", 224, 256, "cuda", args.epochs, repeat)
        print(f"\n{gpus} GPU(s): {', '.join(torch.cuda.get_device_name(i) for i in range(gpus))}")
        report("GPU (nccl)", gpu, gpus)
    else:
        print("\nno CUDA GPU visible: GPU part (resnet18, batch 256 per GPU, nccl) skipped")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
