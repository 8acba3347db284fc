"""Data-parallel jobs on PyTorch's own engine: the elastic launcher starts and supervises the ranks,
DistributedDataParallel averages the gradients, c10d rendezvous joins the nodes.

The worker that holds a job's lease calls `run_distributed`; for a multi-node job every other member of
the gang calls `run_member` with the endpoint slot 0 published. Both run `elastic_launch` (the API behind
`torchrun`) in a thread, so the worker's own signal handling stays in charge, and pass stop requests
(cancel, SIGTERM, a lost lease) to the ranks through a stop file that every rank reads between batches;
the ranks agree on it with one all-reduce, so the whole world stops after the same batch. A rank that
dies makes the agent stop the rest (`max_restarts=0`), and the job goes back to the queue to resume from
its last checkpoint, as a single-process job does, within `max_attempts`.

Each rank runs `workers.training.run_training` with a `Distributed` context: its shard of the training
split per epoch (`DistributedSampler`, reshuffled from the job seed), the model wrapped in DDP, and
validation reduced across ranks so the metrics are those of the whole split. Rank 0 alone writes
progress, metrics and checkpoints, and checkpoints hold the unwrapped model's weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from app.core.config import Settings
from app.db.session import read_scope, session_scope
from app.db.tables import JobStatus, TrainingJob
from app.schemas.jobs import JobSpec
from app.services import gang, queue
from workers.engine import EvalResult, TrainResult, evaluate, resolve_device

log = logging.getLogger(__name__)

STOP_FILE = "stop"
# Stop requests, in the order they win when ranks disagree (a cancel beats a shutdown).
STOP_CODES = {None: 0, "shutdown": 1, "cancelled": 2, "lease_lost": 3}
STOP_REASONS = {code: reason for reason, code in STOP_CODES.items()}
# Failures of the world itself (a rank killed, a peer gone), not of the job: the job resumes.
INFRASTRUCTURE_ERRORS = (
    "disterror",
    "distbackenderror",
    "distnetworkerror",
    "diststoreerror",
    "connection closed by peer",
    "connection reset by peer",
    "gloo",
    "nccl",
)


class WorldError(Exception):
    """A job's distributed configuration this worker cannot run (the message is for the user)."""


@dataclass(frozen=True)
class World:
    """Where a job's ranks run: `nodes` workers, each starting `devices` processes."""

    nodes: int
    devices: int
    backend: str  # gloo on the CPU, nccl on CUDA
    device: str  # the worker's device setting, resolved: cpu, cuda, or cuda:N for one pinned GPU
    node_slot: int = 0
    endpoint: str = "127.0.0.1:0"  # c10d rendezvous; port 0 on one node: the store picks a free port
    local_addr: str = "127.0.0.1"
    members: tuple[str, ...] = ()  # the workers of a multi-node job, in slot order

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices


def plan_world(spec: JobSpec, settings: Settings) -> World:
    """Resolve `devices` and `nodes` on this worker; raises WorldError for what it cannot run."""
    device = resolve_device(settings.device)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        devices = visible if spec.devices == "auto" else spec.devices
        if device.index is not None and devices > 1:
            raise WorldError(
                f"devices {devices}: this worker is pinned to {device} (TRAINSERVE_DEVICE); use auto or cuda"
            )
        if devices > visible:
            raise WorldError(f"devices {devices}: this worker sees {visible} GPU(s)")
        return World(nodes=spec.nodes, devices=devices, backend="nccl", device=str(device))
    devices = 1 if spec.devices == "auto" else spec.devices
    if device.type != "cpu" and (devices > 1 or spec.nodes > 1):
        raise WorldError(f"distributed training is not supported on {device.type}; use cpu or cuda")
    return World(nodes=spec.nodes, devices=devices, backend="gloo", device="cpu")


def distributed_spec(lease: queue.Lease, settings: Settings) -> JobSpec | None:
    """The job's spec when it runs on more than one process, else None (the single-process path)."""
    from workers.training import JobError

    with read_scope(settings) as session:
        job = session.get(TrainingJob, lease.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
    if spec.nodes == 1 and spec.devices == 1:
        return None
    try:
        world = plan_world(spec, settings)
    except WorldError as exc:
        raise JobError(str(exc)) from None
    return spec if world.world_size > 1 else None


def advertised_host(settings: Settings) -> str:
    return settings.advertise_host or socket.gethostname()


def free_port(host: str = "") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------------
# Inside a rank.


class Distributed:
    """One rank's view of the world, with the few collective steps `run_training` needs."""

    def __init__(self, *, spec: JobSpec, world: World, stop_path: Path) -> None:
        self.spec = spec
        self.world = world
        self.rank = torch_dist.get_rank()
        self.world_size = torch_dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world.backend == "nccl":
            pinned = torch.device(world.device)
            self.device = pinned if pinned.index is not None else torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.stop_path = stop_path

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model; the caller keeps the unwrapped model for checkpoints and evaluation.
        With `freeze_epochs` the frozen parameters get no gradient, which DDP must be told about."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=self.spec.freeze_epochs > 0
        )

    def scaled_lr(self) -> float:
        factor = {"none": 1.0, "linear": float(self.world_size), "sqrt": math.sqrt(self.world_size)}
        return self.spec.lr * factor[self.spec.lr_scaling]

    def shard_size(self, samples: int) -> int:
        return math.ceil(samples / self.world_size)

    def epoch_shard(self, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """This rank's training samples for `epoch` (DistributedSampler: shuffled from the job seed and
        the epoch, padded so every rank runs the same number of batches) and a generator for this rank's
        augmentation; the global RNG (dropout) is reseeded per rank too. Both depend only on (seed,
        epoch, rank), so a resumed job draws exactly what an uninterrupted one would."""
        sampler = DistributedSampler(
            range(len(indices)),  # type: ignore[arg-type]  # a sized sequence is all it needs
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.spec.seed,
        )
        sampler.set_epoch(epoch)
        shard = indices[torch.tensor(list(sampler), dtype=torch.long)]
        seed = ((self.spec.seed * 100_003 + epoch) * 4_099 + self.rank) % (2**63 - 1)
        torch.manual_seed(seed)
        return shard, torch.Generator().manual_seed(seed)

    def _all_reduce(self, values: torch.Tensor, op: Any = torch_dist.ReduceOp.SUM) -> torch.Tensor:
        on_device = values.to(self.device)
        torch_dist.all_reduce(on_device, op=op)
        return on_device.cpu()

    def reduce_train(self, result: TrainResult) -> TrainResult:
        """Loss and accuracy over every rank's samples; throughput of the whole world."""
        sums = self._all_reduce(
            torch.tensor(
                [result.loss * result.samples, result.accuracy * result.samples, result.samples],
                dtype=torch.float64,
            )
        )
        slowest = self._all_reduce(
            torch.tensor([result.seconds, result.data_seconds], dtype=torch.float64), torch_dist.ReduceOp.MAX
        )
        samples = round(float(sums[2]))
        return TrainResult(
            loss=float(sums[0]) / samples,
            accuracy=float(sums[1]) / samples,
            samples=samples,
            seconds=float(slowest[0]),
            data_seconds=float(slowest[1]),
        )

    def evaluate(
        self,
        model: nn.Module,
        criterion: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor,
        *,
        num_classes: int,
        **kwargs: Any,
    ) -> EvalResult:
        """`workers.engine.evaluate` over the whole of `indices`, each rank doing every world_size-th
        sample (no padding, so no sample counts twice), exact after an all-reduce of the sums and the
        confusion matrix."""
        shard = indices[self.rank :: self.world_size]
        confusion = torch.zeros((num_classes, num_classes), dtype=torch.float64)
        loss_sum = top5_hits = 0.0
        if len(shard):
            part = evaluate(model, criterion, images, targets, shard, num_classes=num_classes, **kwargs)
            confusion += part.confusion.to(torch.float64).cpu()
            loss_sum = part.loss * part.samples
            top5_hits = (part.top5 or 0.0) * part.samples
        sums = self._all_reduce(torch.cat([torch.tensor([loss_sum, top5_hits]), confusion.flatten()]))
        confusion = sums[2:].round().to(torch.long).view(num_classes, num_classes)
        return result_from_confusion(confusion, loss_sum=float(sums[0]), top5_hits=round(float(sums[1])))

    def local_stop_code(self) -> int:
        try:
            return STOP_CODES.get(self.stop_path.read_text().strip() or None, 0)
        except FileNotFoundError:
            return 0

    def agree_stop(self, local_code: int) -> str | None:
        """Every rank calls this after the same batch; all get the strongest request any rank saw."""
        code = int(self._all_reduce(torch.tensor([local_code], dtype=torch.int64), torch_dist.ReduceOp.MAX))
        return STOP_REASONS[code]

    def broadcast_outcome(self, outcome: tuple[str, str] | None) -> tuple[str, str]:
        """Rank 0's (status, reason), on every rank: whichever node holds rank 0, every agent returns it."""
        box: list[Any] = [outcome]
        torch_dist.broadcast_object_list(box, src=0, device=self.device)
        return tuple(box[0])  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """What the job's `info` records about the world."""
        effective = self.spec.batch_size * self.spec.accumulate_steps * self.world_size
        return {
            "world_size": self.world_size,
            "nodes": self.world.nodes,
            "devices_per_node": self.world.devices,
            "backend": self.world.backend,
            "batch_size_per_process": self.spec.batch_size,
            "effective_batch_size": effective,
            "lr_scaling": self.spec.lr_scaling,
            "lr": self.scaled_lr(),
            "base_lr": self.spec.lr,
            **({"workers": list(self.world.members)} if self.world.members else {}),
        }


def result_from_confusion(confusion: torch.Tensor, *, loss_sum: float, top5_hits: int) -> EvalResult:
    """An EvalResult from summed counts. The per-class metrics come from the same torchmetrics functions
    as `evaluate`, fed the (truth, prediction) pairs the confusion matrix holds, so they cannot differ."""
    from torchmetrics.functional.classification import (
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    num_classes = confusion.shape[0]
    counts = confusion.flatten()
    pairs = torch.arange(num_classes * num_classes).repeat_interleave(counts)
    truth, preds = pairs // num_classes, pairs % num_classes
    samples = int(counts.sum())
    common: dict[str, Any] = {"num_classes": num_classes, "zero_division": 0}
    return EvalResult(
        loss=loss_sum / samples,
        accuracy=float((preds == truth).float().mean()),  # as `evaluate` computes it, to the last bit
        top5=top5_hits / samples if num_classes > 5 else None,
        precision=float(multiclass_precision(preds, truth, average="macro", **common)),
        recall=float(multiclass_recall(preds, truth, average="macro", **common)),
        f1=float(multiclass_f1_score(preds, truth, average="macro", **common)),
        samples=samples,
        confusion=confusion,
        per_class_precision=multiclass_precision(preds, truth, average="none", **common),
        per_class_recall=multiclass_recall(preds, truth, average="none", **common),
        per_class_f1=multiclass_f1_score(preds, truth, average="none", **common),
    )


class RankReporter:
    """`JobReporter`'s interface inside a rank: rank 0 writes progress (which also heartbeats the lease
    and reads cancel requests); every rank agrees on stop requests after each batch."""

    def __init__(self, lease: queue.Lease, settings: Settings, dist: Distributed) -> None:
        self.lease = lease
        self.settings = settings
        self.dist = dist
        self.progress: dict[str, Any] = {}
        self.cancel_requested = False
        self._last_write = 0.0

    def update(self, *, force: bool = False, **fields: Any) -> None:
        if not self.dist.is_writer:
            return
        self.progress.update(fields)
        now = time.monotonic()
        if force or now - self._last_write >= self.settings.progress_interval_seconds:
            with session_scope(self.settings) as session:
                self.cancel_requested = queue.heartbeat(session, self.lease, progress=dict(self.progress))
            self._last_write = now

    def stop_reason(self) -> str | None:
        local = self.dist.local_stop_code()
        if self.cancel_requested:
            local = max(local, STOP_CODES["cancelled"])
        reason = self.dist.agree_stop(local)
        if reason == "lease_lost":
            raise queue.LeaseLost(f"job {self.lease.job_id}: the lease was lost (another worker took over)")
        return reason


@dataclass(frozen=True)
class RankArgs:
    """Everything a rank needs, picklable: it starts in a fresh interpreter (spawn)."""

    lease: queue.Lease
    settings: Settings
    spec: JobSpec
    world: World
    run_dir: str
    parent_pid: int
    threads: int


def _die_with_parent(parent_pid: int) -> None:
    """A rank gets SIGKILL when the worker thread that started it goes away (the worker SIGKILLed), so no
    rank ever outlives its worker; the elastic agent handles every orderly stop itself."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        os._exit(1)


@record
def rank_main(args: RankArgs) -> tuple[str, str]:
    """The entry point of every rank (started by the elastic agent, which set RANK, WORLD_SIZE, ...)."""
    _die_with_parent(args.parent_pid)
    from app.core.logging import configure_logging
    from workers.training import run_training

    rank = int(os.environ["RANK"])
    multiprocessing.current_process().name = f"job{args.lease.job_id}-rank{rank}"
    configure_logging(args.settings.log_level)
    torch.set_num_threads(args.threads)
    if args.world.backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        pinned = torch.device(args.world.device)
        torch.cuda.set_device(pinned if pinned.index is not None else torch.device("cuda", local))
    torch_dist.init_process_group(
        backend=args.world.backend, timeout=timedelta(seconds=args.settings.collective_timeout_seconds)
    )
    try:
        context = Distributed(spec=args.spec, world=args.world, stop_path=Path(args.run_dir) / STOP_FILE)
        reporter = RankReporter(args.lease, args.settings, context)
        log.info(
            "job %s: rank %d of %d on %s (%s)",
            args.lease.job_id,
            context.rank,
            context.world_size,
            context.device,
            args.world.backend,
        )
        status, reason = run_training(args.lease, args.settings, reporter, dist=context)  # type: ignore[arg-type]
        return context.broadcast_outcome((status.value, reason) if context.is_writer else None)
    finally:
        log.info("DEBUG destroying")
        torch_dist.destroy_process_group()
        log.info("DEBUG destroyed")


# --------------------------------------------------------------------------------------------------------
# In the worker.


def _threads_per_rank(settings: Settings, devices: int) -> int:
    return settings.rank_threads or max(1, (os.cpu_count() or 1) // devices)


def launch(
    world: World,
    args: RankArgs,
    *,
    settings: Settings,
    run_id: str,
    stop_reason: Callable[[], str | None],
) -> dict[int, Any]:
    """Run this node's ranks through `elastic_launch` and wait for them, passing stop requests on.

    The agent runs in a thread: off the main thread it installs no signal handlers, so the worker's own
    SIGTERM handling (stop after the batch, requeue) stays in charge. Returns the ranks' return values;
    raises what the launcher raised (ChildFailedError when a rank failed).
    """
    run_dir = Path(args.run_dir)
    config = LaunchConfig(
        min_nodes=world.nodes,
        max_nodes=world.nodes,
        nproc_per_node=world.devices,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=world.endpoint,
        rdzv_configs={
            "is_host": world.node_slot == 0,
            "join_timeout": int(settings.rendezvous_timeout_seconds),
        },
        max_restarts=0,  # a lost rank stops the world; the job resumes through the queue
        monitor_interval=0.2,
        start_method="spawn",
        local_addr=world.local_addr,
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "elastic")),
    )
    outcome: dict[str, Any] = {}

    def run_agent() -> None:
        try:
            outcome["result"] = elastic_launch(config, rank_main)(args)
        except BaseException as exc:
            outcome["error"] = exc

    agent = threading.Thread(target=run_agent, name=f"elastic-agent-{args.lease.job_id}", daemon=True)
    agent.start()
    written: str | None = None
    while agent.is_alive():
        agent.join(0.2)
        reason = stop_reason()
        if reason is not None and reason != written:
            (run_dir / STOP_FILE).write_text(reason)
            written = reason
            log.info("job %s: asking every rank to stop (%s)", args.lease.job_id, reason)
    if "error" in outcome:
        raise outcome["error"]
    return dict(outcome["result"])


def _failure_messages(error: ChildFailedError) -> list[tuple[int, int, str]]:
    out = []
    for rank, failure in sorted(error.failures.items()):
        message = failure.message
        if isinstance(message, dict):
            message = str(message.get("message", message))
        out.append((rank, failure.exitcode, str(message).strip().splitlines()[0] if message else ""))
    return out


def _describe(rank: int, exitcode: int, message: str) -> str:
    if exitcode < 0:
        try:
            return f"rank {rank} was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"rank {rank} was killed by signal {-exitcode}"
    return f"rank {rank} failed: {message}"


def _classify_failure(error: ChildFailedError, lease: queue.Lease) -> tuple[JobStatus, str]:
    """A job error stops the job (as it would on one process); a lost rank or peer resumes it."""
    from workers.training import JobError

    failures = _failure_messages(error)
    for _rank, _code, message in failures:
        if message.startswith("LeaseLost"):
            raise queue.LeaseLost(message.removeprefix("LeaseLost: "))
    for _rank, code, message in failures:
        if code > 0 and message.startswith("JobError"):
            raise JobError(message.removeprefix("JobError: "))
    lost = [(r, c, m) for r, c, m in failures if c < 0 or any(e in m.lower() for e in INFRASTRUCTURE_ERRORS)]
    if not lost:
        rank, code, message = failures[0]
        raise JobError(_describe(rank, code, message))
    return JobStatus.queued, _describe(*lost[0])


def run_distributed(
    lease: queue.Lease, settings: Settings, reporter: Any, *, spec: JobSpec
) -> tuple[JobStatus, str]:
    """Run a leased multi-process job to its end (this worker's node; slot 0 of a gang)."""
    from workers.training import JobError

    try:
        world = plan_world(spec, settings)
    except WorldError as exc:
        raise JobError(str(exc)) from None
    if spec.nodes > 1:
        with read_scope(settings) as session:
            endpoint = gang.slot_endpoint(session, lease)
            members = tuple(gang.gang_workers(session, lease))
        if endpoint is None:
            raise JobError(f"job {lease.job_id}: no rendezvous endpoint was published for this attempt")
        host = advertised_host(settings)
        world = replace(world, endpoint=endpoint, node_slot=0, local_addr=host, members=members)

    def stop_reason() -> str | None:
        try:
            return reporter.stop_reason()  # type: ignore[no-any-return]
        except queue.LeaseLost:
            return "lease_lost"

    status, reason = _run_node(lease, settings, spec, world, stop_reason)
    if status == JobStatus.queued and not reason.startswith("worker shut down"):
        # A rank or a node was lost: the same resume path and attempt budget as a lost worker.
        if lease.attempt >= settings.max_attempts:
            raise JobError(f"{reason}; gave up after {lease.attempt} attempts")
        log.warning("job %s: %s; back to the queue to resume from its last checkpoint", lease.job_id, reason)
        reason = f"{reason}; resuming from the last checkpoint"
    if stop_reason() == "lease_lost":
        raise queue.LeaseLost(f"job {lease.job_id}: the lease was lost (another worker took over)")
    return status, reason


def _run_node(
    lease: queue.Lease,
    settings: Settings,
    spec: JobSpec,
    world: World,
    stop_reason: Callable[[], str | None],
) -> tuple[JobStatus, str]:
    run_dir = tempfile.mkdtemp(prefix=f"trainserve-job{lease.job_id}-")
    args = RankArgs(
        lease=lease,
        settings=settings,
        spec=spec,
        world=world,
        run_dir=run_dir,
        parent_pid=os.getpid(),
        threads=_threads_per_rank(settings, world.devices),
    )
    log.info(
        "job %s: starting %d rank(s) on this node (world size %d, %s, rendezvous %s)",
        lease.job_id,
        world.devices,
        world.world_size,
        world.backend,
        world.endpoint,
    )
    try:
        results = launch(
            world,
            args,
            settings=settings,
            run_id=f"job{lease.job_id}-a{lease.attempt}",
            stop_reason=stop_reason,
        )
    except ChildFailedError as exc:
        return _classify_failure(exc, lease)
    except queue.LeaseLost:
        raise
    except Exception as exc:  # rendezvous timed out or broke: the world never formed
        if type(exc).__module__.startswith("torch.distributed"):
            return JobStatus.queued, f"the ranks could not meet ({type(exc).__name__}: {exc})"
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    status, reason = next(value for value in results.values() if value is not None)
    return JobStatus(status), reason


def run_member(
    settings: Settings, hold: gang.SlotHold, state: gang.GangState, shutdown: threading.Event
) -> None:
    """Run this worker's node of a started multi-node job (slots 1..N-1); the slot-0 worker holds the
    lease and records the outcome, so a member only reports what happened in its log."""
    assert state.attempt is not None and state.endpoint is not None and state.lease_worker_id is not None
    lease = queue.Lease(job_id=hold.job_id, worker_id=state.lease_worker_id, attempt=state.attempt)
    with read_scope(settings) as session:
        job = session.get(TrainingJob, hold.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        members = tuple(gang.gang_workers(session, lease))
    try:
        world = plan_world(spec, settings)
    except WorldError as exc:
        log.error("job %s: cannot join as node %d: %s", hold.job_id, hold.slot, exc)
        return
    world = replace(
        world,
        endpoint=state.endpoint,
        node_slot=hold.slot,
        local_addr=advertised_host(settings),
        members=members,
    )
    try:
        status, reason = _run_node(
            lease, settings, spec, world, lambda: "shutdown" if shutdown.is_set() else None
        )
        log.info("job %s: node %d done: %s (%s)", hold.job_id, hold.slot, status.value, reason)
    except Exception as exc:
        log.warning("job %s: node %d stopped: %s", hold.job_id, hold.slot, exc)
