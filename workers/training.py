"""One job, start to end: data → model → epochs (metrics row and best checkpoint each) → test evaluation.

Reads like torchvision's reference `main()`; the database is reached only through `app.services.queue`
(fenced by the job's lease) and the callbacks of `JobReporter`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from app.core.config import Settings
from app.db.session import read_scope, session_scope
from app.db.tables import CheckpointKind, JobStatus, TrainingJob
from app.schemas.jobs import JobSpec
from app.services import queue
from app.services.jobs import best_checkpoint
from models.checkpoint import bytes_to_state_dict, state_dict_to_bytes
from models.preprocessing import Preprocessing
from models.registry import build_model, get_model_info
from workers.data import decode_dataset, infer_channels, list_images
from workers.engine import (
    EarlyStopping,
    EvalResult,
    Stopped,
    evaluate,
    make_optimizer,
    make_scheduler,
    random_affine,
    resolve_device,
    train_one_epoch,
)
from workers.splits import stratified_split

log = logging.getLogger(__name__)


class JobError(Exception):
    """A job that cannot run for a reason the user can fix; the message becomes the job's `error`."""


class JobReporter:
    """Progress, heartbeats and stop requests for one leased job, written at most once per interval."""

    def __init__(self, lease: queue.Lease, settings: Settings, shutdown: threading.Event) -> None:
        self.lease = lease
        self.settings = settings
        self.shutdown = shutdown
        self.progress: dict[str, Any] = {}
        self.cancel_requested = False
        self._last_write = 0.0

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self.progress.update(fields)
        now = time.monotonic()
        if force or now - self._last_write >= self.settings.progress_interval_seconds:
            with session_scope(self.settings) as session:
                self.cancel_requested = queue.heartbeat(session, self.lease, progress=dict(self.progress))
            self._last_write = now

    def stop_reason(self) -> str | None:
        if self.cancel_requested:
            return "cancelled"
        if self.shutdown.is_set():
            return "shutdown"
        return None


def _metric_value(name: str, result: EvalResult) -> float:
    return {"val_acc": result.accuracy, "val_loss": result.loss, "val_f1": result.f1}[name]


def run_training(lease: queue.Lease, settings: Settings, reporter: JobReporter) -> tuple[JobStatus, str]:
    """Train the leased job; returns the final status and why it stopped. Raises on failure."""
    with read_scope(settings) as session:
        job = session.get(TrainingJob, lease.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        records = list_images(session, spec.dataset_id)

    classes = sorted({record.label for record in records})
    if len(classes) < 2:
        raise JobError(f"dataset {spec.dataset_id} has {len(classes)} class(es); training needs at least 2")
    class_index = {name: i for i, name in enumerate(classes)}
    targets = torch.tensor([class_index[r.label] for r in records], dtype=torch.long)
    splits = stratified_split(
        targets.tolist(),
        [r.split for r in records],
        val_fraction=spec.val_fraction,
        test_fraction=spec.test_fraction,
        seed=spec.seed,
    )
    split_sizes = {name: len(indices) for name, indices in splits.items()}
    if not splits["train"] or not splits["val"]:
        raise JobError(
            f"dataset {spec.dataset_id} is too small to split (train {split_sizes['train']}, "
            f"val {split_sizes['val']}); upload at least 2 images per class"
        )

    info = get_model_info(spec.model)
    channels = spec.channels or infer_channels(records)
    preprocessing = Preprocessing.for_channels(
        image_size=spec.image_size or info.default_image_size, channels=channels, mean=info.mean, std=info.std
    )
    with session_scope(settings) as session:
        queue.start_attempt(session, lease, classes=classes, split_sizes=split_sizes)
    log.info(
        "job %s: %d images, %d classes, splits %s", lease.job_id, len(records), len(classes), split_sizes
    )

    reporter.update(force=True, phase="caching", epoch=0, epochs=spec.epochs, done=0, total=len(records))
    images = decode_dataset(
        settings,
        records,
        preprocessing,
        on_progress=lambda done, total: reporter.update(phase="caching", done=done, total=total),
    )

    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    device = resolve_device(settings.device)
    model = build_model(
        spec.model, num_classes=len(classes), in_channels=channels, image_size=preprocessing.image_size
    ).to(device)
    optimizer = make_optimizer(
        model, name=spec.optimizer, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    scheduler = make_scheduler(
        optimizer, name=spec.scheduler, epochs=spec.epochs, step_size=spec.step_size, gamma=spec.gamma
    )
    train_criterion = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    if spec.augmentation == "basic":

        def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return random_affine(batch, generator=gen, horizontal_flip=spec.horizontal_flip)

    meta_base = {
        "architecture": spec.model,
        "classes": classes,
        "preprocessing": preprocessing.to_meta(),
        "job_id": lease.job_id,
        "monitor": spec.monitor,
    }
    index = {name: torch.tensor(ids, dtype=torch.long) for name, ids in splits.items()}
    eval_batch = max(spec.batch_size * 2, 256)
    tracker = EarlyStopping(mode=spec.monitor_mode, patience=spec.early_stopping_patience)
    stop_reason = f"completed {spec.epochs} epochs"

    for epoch in range(1, spec.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        epoch_started = time.perf_counter()

        def on_batch(batch: int, batches: int, epoch: int = epoch) -> None:
            reporter.update(
                phase="training",
                epoch=epoch,
                batch=batch,
                batches=batches,
                fraction=((epoch - 1) + batch / batches) / spec.epochs,
            )
            reason = reporter.stop_reason()
            if reason:
                raise Stopped(reason)

        try:
            train = train_one_epoch(
                model,
                train_criterion,
                optimizer,
                images,
                targets,
                index["train"],
                batch_size=spec.batch_size,
                preprocessing=preprocessing,
                device=device,
                generator=generator,
                augment=augment,
                on_batch=on_batch,
            )
        except Stopped as stopped:
            return _stopped(lease, settings, stopped.reason, epoch - 1)
        reporter.update(phase="validating", epoch=epoch)
        val = evaluate(
            model,
            eval_criterion,
            images,
            targets,
            index["val"],
            num_classes=len(classes),
            batch_size=eval_batch,
            preprocessing=preprocessing,
            device=device,
        )
        if scheduler is not None:
            scheduler.step()

        value = _metric_value(spec.monitor, val)
        improved = tracker.update(value)
        with session_scope(settings) as session:
            queue.record_epoch(
                session,
                lease,
                values={
                    "epoch": epoch,
                    "train_loss": train.loss,
                    "train_acc": train.accuracy,
                    "val_loss": val.loss,
                    "val_acc": val.accuracy,
                    "val_top5": val.top5,
                    "val_precision": val.precision,
                    "val_recall": val.recall,
                    "val_f1": val.f1,
                    "lr": lr,
                    "seconds": time.perf_counter() - epoch_started,
                    "images_per_second": train.images_per_second,
                    "data_seconds": train.data_seconds,
                },
            )
            if improved:
                meta = {**meta_base, "epoch": epoch, "metric": spec.monitor, "value": value}
                queue.store_checkpoint(
                    session,
                    lease,
                    kind=CheckpointKind.best,
                    epoch=epoch,
                    metric=spec.monitor,
                    value=value,
                    meta=meta,
                    weights=state_dict_to_bytes(model.state_dict(), meta),
                )
        log.info(
            "job %s epoch %d/%d: train loss %.4f acc %.4f, val loss %.4f acc %.4f%s",
            lease.job_id,
            epoch,
            spec.epochs,
            train.loss,
            train.accuracy,
            val.loss,
            val.accuracy,
            " (best)" if improved else "",
        )
        reporter.update(force=True, phase="training", epoch=epoch, fraction=epoch / spec.epochs)
        reason = reporter.stop_reason()
        if reason:
            return _stopped(lease, settings, reason, epoch)
        if tracker.should_stop:
            stop_reason = (
                f"early stopping after epoch {epoch}: {spec.monitor} did not improve for "
                f"{spec.early_stopping_patience} epochs"
            )
            break

    _evaluate_best_on_test(
        lease,
        settings,
        reporter,
        model,
        eval_criterion,
        images,
        targets,
        index,
        classes,
        eval_batch,
        preprocessing,
        device,
    )
    return JobStatus.succeeded, stop_reason


def _stopped(lease: queue.Lease, settings: Settings, reason: str, epochs_done: int) -> tuple[JobStatus, str]:
    if reason == "cancelled":
        return JobStatus.cancelled, f"cancelled after {epochs_done} epoch(s)"
    return JobStatus.queued, f"worker shut down after {epochs_done} epoch(s)"


def _evaluate_best_on_test(
    lease: queue.Lease,
    settings: Settings,
    reporter: JobReporter,
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    index: dict[str, torch.Tensor],
    classes: list[str],
    batch_size: int,
    preprocessing: Preprocessing,
    device: torch.device,
) -> None:
    """Reload the best weights, as stored, and store their test-split evaluation."""
    if len(index["test"]) == 0:
        log.info("job %s: no test images; skipping the test evaluation", lease.job_id)
        return
    reporter.update(force=True, phase="testing")
    with read_scope(settings) as session:
        checkpoint = best_checkpoint(session, lease.job_id)
        state_dict, _ = bytes_to_state_dict(checkpoint.weights)
        best_epoch = checkpoint.epoch
    model.load_state_dict(state_dict)
    result = evaluate(
        model,
        criterion,
        images,
        targets,
        index["test"],
        num_classes=len(classes),
        batch_size=batch_size,
        preprocessing=preprocessing,
        device=device,
    )
    support = result.confusion.sum(dim=1)
    per_class = [
        {
            "name": name,
            "precision": float(result.per_class_precision[i]),
            "recall": float(result.per_class_recall[i]),
            "f1": float(result.per_class_f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    ]
    with session_scope(settings) as session:
        queue.store_evaluation(
            session,
            lease,
            values={
                "split": "test",
                "epoch": best_epoch,
                "num_samples": result.samples,
                "loss": result.loss,
                "accuracy": result.accuracy,
                "top5": result.top5,
                "macro_precision": result.precision,
                "macro_recall": result.recall,
                "macro_f1": result.f1,
                "per_class": per_class,
                "confusion_matrix": result.confusion.tolist(),
            },
        )
    log.info(
        "job %s: test accuracy %.4f on %d images (best epoch %d)",
        lease.job_id,
        result.accuracy,
        result.samples,
        best_epoch,
    )
