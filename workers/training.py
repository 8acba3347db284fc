"""One job, start to end: data → model → epochs (metrics row and best checkpoint each) → test evaluation.

Reads like torchvision's reference `main()`; the database is reached only through `app.services.queue`
(fenced by the job's lease) and the callbacks of `JobReporter`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from app.core.config import Settings
from app.core.errors import NotFound
from app.db.session import read_scope, session_scope
from app.db.tables import CheckpointKind, JobStatus, TrainingJob
from app.schemas.jobs import JobSpec
from app.services import queue
from app.services.jobs import best_checkpoint
from app.services.weights import get_weights
from models.checkpoint import bytes_to_state_dict, state_dict_to_bytes
from models.preprocessing import Preprocessing, normalize
from models.pretrained import PretrainedWeightsMissing, load_compatible, load_pretrained
from models.registry import backbone_parameters, build_model, get_model_info
from workers.augment import build_augment, build_mix
from workers.autotune import StepFormat, choose_cpu_step_format, cpu_bf16_native
from workers.batches import place_on_device
from workers.data import infer_channels, list_images, load_images
from workers.engine import (
    EarlyStopping,
    EvalResult,
    LRSchedule,
    Stopped,
    evaluate,
    make_optimizer,
    make_scheduler,
    resolve_device,
    train_one_epoch,
)
from workers.progress import JobReporter
from workers.resume import TrainingState
from workers.splits import stratified_split

if TYPE_CHECKING:
    from workers.distributed import Distributed

log = logging.getLogger(__name__)


class JobError(Exception):
    """A job that cannot run for a reason the user can fix; the message becomes the job's `error`."""


def _metric_value(name: str, result: EvalResult) -> float:
    return {"val_acc": result.accuracy, "val_loss": result.loss, "val_f1": result.f1}[name]


def resolve_precision(setting: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a grad scaler is needed). bf16/fp16 on CUDA; on the CPU only
    when bf16 is asked for (under `auto` the CPU step-format trial may still choose bf16)."""
    if setting == "off":
        return None, False
    if device.type != "cuda":
        if setting == "fp16":
            raise JobError("mixed_precision 'fp16' needs a CUDA device; use 'bf16' or 'off' on the CPU")
        return (torch.bfloat16, False) if setting == "bf16" else (None, False)
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16, True
    return torch.bfloat16, False


def _trial_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    train: torch.Tensor,
    batch_size: int,
    preprocessing: Preprocessing,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One real training batch, normalised as training will see it, for the step-format trial."""
    ids = train[:batch_size]
    return normalize(images[ids], preprocessing), targets[ids]


def dataset_mean_std(images: torch.Tensor, indices: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training split, in [0, 1] pixel units."""
    sums = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(sums)
    count = 0
    for start in range(0, len(indices), 1024):
        chunk = images[indices[start : start + 1024]].to(torch.float64).div_(255.0)
        sums += chunk.sum(dim=(0, 2, 3))
        squares += chunk.pow(2).sum(dim=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = sums / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def balanced_class_weights(train_targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (k * n_c), as scikit-learn's `class_weight='balanced'`."""
    counts = torch.bincount(train_targets, minlength=num_classes).clamp_min(1).float()
    return counts.sum() / (num_classes * counts)


def initialise(model: nn.Module, spec: JobSpec, settings: Settings) -> dict[str, Any]:
    """Load pretrained or earlier-job weights into `model`; returns what was loaded and skipped."""
    if spec.init == "pretrained":
        try:
            report = load_pretrained(model, spec.model)
        except PretrainedWeightsMissing as exc:
            raise JobError(str(exc)) from None
        return {"source": "pretrained", **report.to_dict()}
    if spec.init_from_job is not None:
        with read_scope(settings) as session:
            source = session.get(TrainingJob, spec.init_from_job)
            if source is None:
                raise JobError(f"init_from_job: job {spec.init_from_job} not found")
            checkpoint = best_checkpoint(session, spec.init_from_job)
            state_dict, meta = bytes_to_state_dict(checkpoint.weights)
        if meta["architecture"] != spec.model:
            raise JobError(
                f"init_from_job: job {spec.init_from_job} trained {meta['architecture']}, not {spec.model}"
            )
        report = load_compatible(model, state_dict, first_conv=get_model_info(spec.model).first_conv)
        return {"source": f"job {spec.init_from_job} (epoch {checkpoint.epoch})", **report.to_dict()}
    if spec.init_from_weights is not None:
        return initialise_from_upload(model, spec, settings)
    return {"source": "random"}


def initialise_from_upload(model: nn.Module, spec: JobSpec, settings: Settings) -> dict[str, Any]:
    """Load the compatible tensors of weights uploaded with POST /weights (stored as safetensors)."""
    with read_scope(settings) as session:
        try:
            uploaded = get_weights(session, spec.init_from_weights, with_data=True)  # type: ignore[arg-type]
        except NotFound:
            raise JobError(f"init_from_weights: weights {spec.init_from_weights} not found") from None
        state_dict = load_safetensors_bytes(uploaded.data)
    report = load_compatible(model, state_dict, first_conv=get_model_info(spec.model).first_conv)
    if not report.loaded and not report.adapted:
        raise JobError(
            f"init_from_weights: no tensor of weights {spec.init_from_weights} fits {spec.model} "
            f"(names and shapes differ from the model's); first keys: {', '.join(list(state_dict)[:5])}"
        )
    return {"source": f"weights {spec.init_from_weights}", **report.to_dict()}


def set_backbone_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    # requires_grad_(False) keeps the grads None, so the optimiser leaves frozen weights alone entirely.
    for parameter in backbone_parameters(model, name):
        parameter.requires_grad_(trainable)


def run_training(
    lease: queue.Lease, settings: Settings, reporter: JobReporter, *, dist: Distributed | None = None
) -> tuple[JobStatus, str]:
    """Train the leased job; returns the final status and why it stopped. Raises on failure.

    With `dist` this is one rank of a data-parallel job (see workers.distributed): the hooks marked
    `dist` shard the data, wrap the model in DDP and reduce the metrics, and only rank 0 writes.
    """
    writer = dist is None or dist.is_writer
    with read_scope(settings) as session:
        job = session.get(TrainingJob, lease.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        previous_info = dict(job.info or {})
        # Every attempt trains on the images the first one saw, even if more were uploaded since.
        cutoff = previous_info.get("image_cutoff_id")
        records = list_images(session, spec.dataset_id, max_id=cutoff)
        resume_from = queue.last_checkpoint(session, lease.job_id)

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
    index = {name: torch.tensor(ids, dtype=torch.long) for name, ids in splits.items()}

    model_info = get_model_info(spec.model)
    channels = spec.channels or infer_channels(records)
    preprocessing = Preprocessing.for_channels(
        image_size=spec.image_size or model_info.default_image_size,
        channels=channels,
        mean=model_info.mean,
        std=model_info.std,
    )
    device = dist.device if dist is not None else resolve_device(settings.device)
    autocast_dtype, use_scaler = resolve_precision(spec.mixed_precision, device)
    resume_epoch = resume_from.epoch if resume_from is not None else 0
    if writer:
        with session_scope(settings) as session:
            queue.start_attempt(
                session, lease, classes=classes, split_sizes=split_sizes, resume_epoch=resume_epoch
            )
    log.info(
        "job %s: %d images, %d classes, splits %s", lease.job_id, len(records), len(classes), split_sizes
    )

    reporter.update(force=True, phase="caching", epoch=0, epochs=spec.epochs, done=0, total=len(records))

    def stop_if_asked() -> None:  # while caching, or waiting for another worker's build of the same
        reason = reporter.stop_reason()
        if reason:
            raise Stopped(reason)

    def caching(done: int, total: int) -> None:
        reporter.update(phase="caching", done=done, total=total)
        stop_if_asked()

    # dist: every rank reads the same cache entry; the file lock lets one build it while the others
    # wait, and they all map the finished file read-only.
    try:
        images, cache_entry = load_images(
            settings, records, preprocessing, on_progress=caching, on_wait=stop_if_asked
        )
    except Stopped as stopped:
        return _stopped(stopped.reason, resume_epoch)
    if spec.normalization == "dataset":
        mean, std = dataset_mean_std(images, index["train"])
        preprocessing = replace(preprocessing, mean=tuple(mean), std=tuple(std))
    images, targets, placement = place_on_device(
        images, targets, device, max_fraction=settings.device_data_fraction
    )
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    model = build_model(
        spec.model, num_classes=len(classes), in_channels=channels, image_size=preprocessing.image_size
    )
    init_report = previous_info.get("init", {}) if resume_from else initialise(model, spec, settings)

    def new_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(
            module,
            name=spec.optimizer,
            lr=dist.scaled_lr() if dist is not None else spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.nesterov,
        )

    # channels_last lets cuDNN use its tensor-core convolutions. On the CPU it depends on the network
    # (so does bf16), so a short timed trial picks.
    channels_last = on_cuda
    step_format = None
    if device.type == "cpu" and dist is None and not spec.compile and settings.cpu_autotune_seconds > 0:
        step_format = choose_cpu_step_format(
            model,
            new_optimizer,
            *_trial_batch(images, targets, index["train"], spec.batch_size, preprocessing),
            default=StepFormat(channels_last=False, autocast_dtype=autocast_dtype),
            try_bf16=spec.mixed_precision == "auto" and cpu_bf16_native(),
            key=(spec.model, len(classes), channels, preprocessing.image_size, spec.batch_size),
            budget_seconds=settings.cpu_autotune_seconds,
        )
        channels_last = step_format.chosen.channels_last
        autocast_dtype = step_format.chosen.autocast_dtype
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    train_model = dist.wrap(model) if dist is not None else model  # `model` stays unwrapped: checkpoints
    optimizer = new_optimizer(model)
    train_samples = dist.shard_size(len(index["train"])) if dist is not None else len(index["train"])
    batches_per_epoch = math.ceil(train_samples / spec.batch_size)
    schedule = LRSchedule(
        optimizer,
        make_scheduler(
            optimizer,
            name=spec.scheduler,
            epochs=spec.epochs - spec.warmup_epochs,
            step_size=spec.step_size,
            gamma=spec.gamma,
            milestones=[m - spec.warmup_epochs for m in spec.milestones if m > spec.warmup_epochs] or [10**6],
            restart_epochs=spec.restart_epochs,
            restart_mult=spec.restart_mult,
            plateau_patience=spec.plateau_patience,
            plateau_mode=spec.monitor_mode,
            steps_per_epoch=math.ceil(batches_per_epoch / spec.accumulate_steps),
        ),
        warmup_epochs=spec.warmup_epochs,
    )
    weights = (
        balanced_class_weights(targets[index["train"]], len(classes)).to(device)
        if spec.class_weights == "balanced"
        else None
    )
    # The same weighted criterion for plain, label-smoothed and mixed (soft) targets.
    train_criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=spec.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    augment = build_augment(spec.augmentation, horizontal_flip=spec.horizontal_flip)
    mix = build_mix(mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha, num_classes=len(classes))
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(spec.ema_decay), use_buffers=True
        )
        if spec.ema_decay is not None
        else None
    )
    evaluated: nn.Module = ema.module if ema is not None else model
    # Compiled for training only: the plain module shares its parameters and is what gets validated
    # (inference mode would compile a second graph) and saved (no `_orig_mod.` prefixes).
    trained: nn.Module = torch.compile(train_model) if spec.compile else train_model  # type: ignore[assignment]

    job_info = {
        "image_size": preprocessing.image_size,
        "channels": channels,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "normalization": spec.normalization,
        "device": str(device),
        "mixed_precision": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "off",
        "grad_scaler": use_scaler,
        "effective_batch_size": spec.batch_size * spec.accumulate_steps,
        "class_weights": weights.tolist() if weights is not None else None,
        "init": init_report,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_cutoff_id": max((r.id for r in records), default=0),
        "resumed_from_epoch": resume_epoch or None,
        "world_size": 1,
        "data_cache": cache_entry.summary(),
        "data_placement": placement,
        "channels_last": channels_last,
        "step_format": step_format.summary() if step_format is not None else None,
        "compile": spec.compile,
    }
    if dist is not None:
        job_info.update(dist.describe())
    if writer:
        with session_scope(settings) as session:
            queue.set_job_info(session, lease, info=job_info)

    meta_base = {
        "architecture": spec.model,
        "classes": classes,
        "preprocessing": preprocessing.to_meta(),
        "job_id": lease.job_id,
        "monitor": spec.monitor,
        "ema": ema is not None,
    }
    # Validation has no gradient, so larger batches: on the GPU to fill it; on the CPU only a little
    # larger (simple_cnn validates as fast at 64 as at 256, and 256 held 25 MB per activation).
    eval_batch = max(spec.batch_size * 4, 1024) if on_cuda else max(spec.batch_size * 2, 64)
    tracker = EarlyStopping(
        mode=spec.monitor_mode, patience=spec.early_stopping_patience, min_delta=spec.min_delta
    )
    state = TrainingState(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        tracker=tracker,
        generator=generator,
        scaler=scaler,
        ema=ema,
    )
    if resume_from is not None:
        state.restore(resume_from.weights)
        log.info("job %s: resuming after epoch %d", lease.job_id, resume_epoch)
    stop_reason = f"completed {spec.epochs} epochs"

    for epoch in range(resume_epoch + 1, spec.epochs + 1):
        lr = schedule.epoch_start(epoch)
        if spec.freeze_epochs:
            set_backbone_trainable(model, spec.model, trainable=epoch > spec.freeze_epochs)
        epoch_started = time.perf_counter()

        def on_batch(batch: int, batches: int, epoch: int = epoch) -> None:
            reporter.update(
                force=batch == 1 and epoch == resume_epoch + 1,  # the job's first batch shows at once
                phase="training",
                epoch=epoch,
                batch=batch,
                batches=batches,
                fraction=((epoch - 1) + batch / batches) / spec.epochs,
                images=min(batch * spec.batch_size, len(index["train"])),
            )
            reason = reporter.stop_reason()
            if reason:
                raise Stopped(reason)

        train_indices, epoch_generator = index["train"], generator
        if dist is not None:
            train_indices, epoch_generator = dist.epoch_shard(index["train"], epoch)
        try:
            train = train_one_epoch(
                trained,
                train_criterion,
                optimizer,
                images,
                targets,
                train_indices,
                batch_size=spec.batch_size,
                preprocessing=preprocessing,
                device=device,
                generator=epoch_generator,
                augment=augment,
                on_batch=on_batch,
                mix=mix,
                autocast_dtype=autocast_dtype,
                scaler=scaler,
                accumulate_steps=spec.accumulate_steps,
                grad_clip_norm=spec.grad_clip_norm,
                ema=ema,
                on_optimizer_step=schedule.optimizer_step,
                channels_last=channels_last,
            )
        except Stopped as stopped:
            return _stopped(stopped.reason, epoch - 1)
        if dist is not None:
            train = dist.reduce_train(train)
        reporter.update(phase="validating", epoch=epoch)
        val = (dist.evaluate if dist is not None else evaluate)(
            evaluated,
            eval_criterion,
            images,
            targets,
            index["val"],
            num_classes=len(classes),
            batch_size=eval_batch,
            preprocessing=preprocessing,
            device=device,
            autocast_dtype=autocast_dtype,
            channels_last=channels_last,
        )
        value = _metric_value(spec.monitor, val)
        schedule.epoch_end(epoch, value)
        improved = tracker.update(value)
        if writer:  # dist: rank 0 alone writes metrics and checkpoints
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
                        weights=state_dict_to_bytes(evaluated.state_dict(), meta),
                    )
                # In the same transaction as the metrics row: a resumed job never repeats or skips an epoch.
                queue.store_checkpoint(
                    session,
                    lease,
                    kind=CheckpointKind.last,
                    epoch=epoch,
                    metric=spec.monitor,
                    value=value,
                    meta={"job_id": lease.job_id, "epoch": epoch},
                    weights=state.save(epoch=epoch, meta={"job_id": lease.job_id}),
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
        reporter.update(
            force=True,
            phase="training",
            epoch=epoch,
            fraction=epoch / spec.epochs,
            images_per_second=round(train.images_per_second, 1),
        )
        reason = reporter.stop_reason()
        if reason:
            return _stopped(reason, epoch)
        if tracker.should_stop:
            stop_reason = (
                f"early stopping after epoch {epoch}: {spec.monitor} did not improve for "
                f"{spec.early_stopping_patience} epochs"
            )
            break

    if writer:
        _evaluate_best_on_test(
            lease,
            settings,
            reporter,
            evaluated,
            eval_criterion,
            images,
            targets,
            index,
            classes,
            eval_batch,
            preprocessing,
            device,
            autocast_dtype,
            channels_last=channels_last,
        )
    return JobStatus.succeeded, stop_reason


def _stopped(reason: str, epochs_done: int) -> tuple[JobStatus, str]:
    """A cancelled job ends; a job stopped by a shutdown goes back to the queue (status queued)."""
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
    autocast_dtype: torch.dtype | None,
    *,
    channels_last: bool = False,
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
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
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
