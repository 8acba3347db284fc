"""The training engine: plain functions over tensors, in the manner of torchvision's reference
`train_one_epoch` / `evaluate`. No database here: the worker passes callbacks for progress and stops."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from models.preprocessing import Preprocessing, normalize
from workers.batches import iterate_batches

ProgressCallback = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], str | None]


class Stopped(Exception):
    """Training was asked to stop mid-epoch (cancel or shutdown); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class TrainResult:
    loss: float
    accuracy: float
    samples: int
    seconds: float
    data_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    top5: float | None
    precision: float
    recall: float
    f1: float
    samples: int
    confusion: torch.Tensor = field(repr=False)
    per_class_precision: torch.Tensor = field(repr=False)
    per_class_recall: torch.Tensor = field(repr=False)
    per_class_f1: torch.Tensor = field(repr=False)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: decaying norms and biases hurts and is not what papers do."""
    decay, no_decay = [], []
    for parameter in model.parameters():  # frozen ones too: they rejoin training when unfrozen
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Built over every parameter, frozen ones included: while frozen their grad stays None and the
    optimiser skips them (no weight decay, no momentum), and unfreezing needs no new optimiser.

    Adam and AdamW use their fused kernels (one pass over all parameters, on the CPU as on CUDA): for a
    small network the per-parameter loop of the default implementation is a third of the step. Not SGD:
    its fused kernel fails once a parameter unfrozen mid-training joins with no momentum buffer."""
    groups = param_groups(model, weight_decay)
    fused = all(p.device.type in {"cpu", "cuda"} and p.is_floating_point() for p in model.parameters())
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    epochs: int,
    step_size: int = 10,
    gamma: float = 0.1,
    milestones: Sequence[int] = (30, 60),
    restart_epochs: int = 10,
    restart_mult: int = 1,
    plateau_patience: int = 2,
    plateau_mode: str = "max",
    steps_per_epoch: int = 1,
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """The main schedule over `epochs` epochs (after any warm-up). All step once per epoch except
    `onecycle`, which steps once per optimiser step; `plateau` steps with the monitored metric."""
    lr_scheduler = torch.optim.lr_scheduler
    if name == "none":
        return None
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "multistep":
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if name == "cosine_restarts":
        return lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=restart_epochs, T_mult=restart_mult)
    if name == "plateau":
        return lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=plateau_mode, factor=gamma, patience=plateau_patience
        )
    if name == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        return lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=max(epochs * steps_per_epoch, 2)
        )
    raise ValueError(f"unknown scheduler {name!r}")


class LRSchedule:
    """Linear warm-up for `warmup_epochs`, then the main scheduler; one object for the loop to drive."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        main: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None,
        *,
        warmup_epochs: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.main = main
        self.warmup_epochs = warmup_epochs
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.per_step = isinstance(main, torch.optim.lr_scheduler.OneCycleLR)

    def epoch_start(self, epoch: int) -> float:
        """Set the warm-up lr for this 1-based epoch; returns the lr the epoch starts with."""
        if epoch <= self.warmup_epochs:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * epoch / self.warmup_epochs
        return float(self.optimizer.param_groups[0]["lr"])

    def optimizer_step(self) -> None:
        if self.per_step and self.main is not None:
            self.main.step()

    def epoch_end(self, epoch: int, monitored: float) -> None:
        if self.main is None or self.per_step or epoch <= self.warmup_epochs:
            return
        if isinstance(self.main, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.main.step(monitored)
        else:
            self.main.step()

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict() if self.main is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.main is not None and state["main"] is not None:
            self.main.load_state_dict(state["main"])


def random_affine(
    batch: torch.Tensor,
    *,
    generator: torch.Generator,
    max_rotation_deg: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 0.1,
    horizontal_flip: bool = False,
) -> torch.Tensor:
    """Per-image random rotation, scale, shift (and flip) of a float batch in [0, 1], all at once."""
    n = batch.shape[0]
    device = batch.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(device)

    angle = uniform(-max_rotation_deg, max_rotation_deg) * math.pi / 180
    zoom = uniform(*scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, uniform(-max_shift, max_shift) * 2], dim=1),
            torch.stack([sin, cos, uniform(-max_shift, max_shift) * 2], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if horizontal_flip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(device).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    return out


class Normalizer:
    """`models.preprocessing.normalize` with its mean and std made once per device, applied in place:
    the same numbers, without building small tensors on every batch."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device) -> None:
        self.mean = torch.tensor(preprocessing.mean, device=device).view(-1, 1, 1)
        self.std = torch.tensor(preprocessing.std, device=device).view(-1, 1, 1)

    def unit(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 → float in [0, 1] (what augmentation works on)."""
        return batch.float().div_(255.0)

    def standardize(self, unit: torch.Tensor) -> torch.Tensor:
        return unit.sub_(self.mean).div_(self.std)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    *,
    batch_size: int,
    preprocessing: Preprocessing,
    device: torch.device,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    on_batch: Callable[[int, int], None],
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulate_steps: int = 1,
    grad_clip_norm: float | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    on_optimizer_step: Callable[[], None] | None = None,
    channels_last: bool = False,
) -> TrainResult:
    """One pass over `indices` of the uint8 `images` in a seeded random order.

    `images` and `targets` may already live on `device` (the whole dataset resident on the GPU) or in
    host memory (memory-mapped); `workers.data.iterate_batches` brings each batch over. `augment` works
    on floats in [0, 1] before normalisation; `mix` (MixUp/CutMix) on the normalised batch, turning
    targets into class probabilities. Gradients are accumulated over `accumulate_steps` batches,
    unscaled (fp16) before clipping, and the EMA follows every optimiser step. Loss and accuracy are
    summed on the device, so no batch waits for the GPU just to report them.
    """
    model.train()
    order = indices[torch.randperm(len(indices), generator=generator)]
    batches = math.ceil(len(order) / batch_size)
    normalizer = Normalizer(preprocessing, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, data_seconds = 0, 0.0
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    # Closed on the way out, also when a stop request ends the epoch early (no prefetch left running).
    with contextlib.closing(
        iterate_batches(images, targets, order, batch_size=batch_size, device=device)
    ) as loader:
        for batch_index in range(batches):
            data_started = time.perf_counter()
            batch, target = next(loader)
            inputs = normalizer.unit(batch)
            if augment is not None:
                inputs = augment(inputs, generator)
            inputs = normalizer.standardize(inputs).contiguous(memory_format=memory_format)
            loss_target = target
            if mix is not None:
                inputs, loss_target = mix(inputs, target)
            data_seconds += time.perf_counter() - data_started

            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = model(inputs)
                loss = criterion(output.float(), loss_target)
            scaled = loss / accumulate_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()

            last = batch_index + 1 == batches
            if (batch_index + 1) % accumulate_steps == 0 or last:
                if grad_clip_norm is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
                if on_optimizer_step is not None:
                    on_optimizer_step()

            n = target.shape[0]
            # Sample-weighted, so a short last batch counts for what it is.
            total_loss += loss.detach().double() * n
            correct += (output.detach().argmax(dim=1) == target).sum()
            seen += n
            on_batch(batch_index + 1, batches)
    seconds = time.perf_counter() - started
    return TrainResult(
        loss=float(total_loss) / seen,
        accuracy=int(correct) / seen,
        samples=seen,
        seconds=seconds,
        data_seconds=data_seconds,
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int,
    preprocessing: Preprocessing,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> EvalResult:
    """Loss, accuracy, top-5 and macro precision/recall/F1 over `indices`, in eval mode, with no
    gradient; results stay on the device until the pass is over."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    predictions, labels = [], []
    k = min(5, num_classes)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch, target in iterate_batches(images, targets, indices, batch_size=batch_size, device=device):
        inputs = normalize(batch, preprocessing).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model(inputs).float()
        total_loss += criterion(output, target).double() * target.shape[0]
        top5_hits += (output.topk(k, dim=1).indices == target.unsqueeze(1)).any(dim=1).sum()
        predictions.append(output.argmax(dim=1))
        labels.append(target)
    model.train(was_training)

    preds = torch.cat(predictions).cpu()
    truth = torch.cat(labels).cpu()
    samples = int(truth.numel())
    common: dict[str, Any] = {"num_classes": num_classes, "zero_division": 0}
    per_class_p = multiclass_precision(preds, truth, average="none", **common)
    per_class_r = multiclass_recall(preds, truth, average="none", **common)
    per_class_f1 = multiclass_f1_score(preds, truth, average="none", **common)
    return EvalResult(
        loss=float(total_loss) / samples,
        accuracy=float((preds == truth).float().mean()),
        top5=int(top5_hits) / samples if num_classes > 5 else None,
        precision=float(multiclass_precision(preds, truth, average="macro", **common)),
        recall=float(multiclass_recall(preds, truth, average="macro", **common)),
        f1=float(multiclass_f1_score(preds, truth, average="macro", **common)),
        samples=samples,
        confusion=multiclass_confusion_matrix(preds, truth, num_classes=num_classes),
        per_class_precision=per_class_p,
        per_class_recall=per_class_r,
        per_class_f1=per_class_f1,
    )


class EarlyStopping:
    """Tracks the monitored metric; `improved` decides the best checkpoint, `should_stop` the end."""

    def __init__(self, *, mode: str, patience: int | None, min_delta: float = 0.0) -> None:
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience
