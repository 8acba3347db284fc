"""The training engine: plain functions over tensors, in the manner of torchvision's reference
`train_one_epoch` / `evaluate`. No database here: the worker passes callbacks for progress and stops."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, *, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, epochs: int, step_size: int, gamma: float
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """An epoch-level schedule; the lr an epoch ran with is recorded in its metrics row."""
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    raise ValueError(f"unknown scheduler {name!r}")


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
) -> TrainResult:
    """One pass over `indices` of the uint8 `images` in a seeded random order."""
    model.train()
    order = indices[torch.randperm(len(indices), generator=generator)]
    batches = math.ceil(len(order) / batch_size)
    total_loss, correct, seen, data_seconds = 0.0, 0, 0, 0.0
    started = time.perf_counter()
    for batch_index in range(batches):
        data_started = time.perf_counter()
        batch_ids = order[batch_index * batch_size : (batch_index + 1) * batch_size]
        batch = images[batch_ids].to(device, non_blocking=True)
        target = targets[batch_ids].to(device, non_blocking=True)
        if augment is not None:
            inputs = augment(batch.float().div_(255.0), generator)
            inputs = normalize(inputs.mul_(255.0), preprocessing)
        else:
            inputs = normalize(batch, preprocessing)
        data_seconds += time.perf_counter() - data_started

        output = model(inputs)
        loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = target.shape[0]
        total_loss += loss.item() * n  # sample-weighted, so a short last batch counts for what it is
        correct += int((output.argmax(dim=1) == target).sum())
        seen += n
        on_batch(batch_index + 1, batches)
    seconds = time.perf_counter() - started
    return TrainResult(
        loss=total_loss / seen,
        accuracy=correct / seen,
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
) -> EvalResult:
    """Loss, accuracy, top-5 and macro precision/recall/F1 over `indices`, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, top5_hits = 0.0, 0
    predictions, labels = [], []
    k = min(5, num_classes)
    for start in range(0, len(indices), batch_size):
        batch_ids = indices[start : start + batch_size]
        inputs = normalize(images[batch_ids].to(device, non_blocking=True), preprocessing)
        target = targets[batch_ids].to(device, non_blocking=True)
        output = model(inputs).float()
        total_loss += criterion(output, target).item() * target.shape[0]
        top5_hits += int((output.topk(k, dim=1).indices == target.unsqueeze(1)).any(dim=1).sum())
        predictions.append(output.argmax(dim=1).cpu())
        labels.append(target.cpu())
    model.train(was_training)

    preds = torch.cat(predictions)
    truth = torch.cat(labels)
    samples = int(truth.numel())
    common: dict[str, Any] = {"num_classes": num_classes, "zero_division": 0}
    per_class_p = multiclass_precision(preds, truth, average="none", **common)
    per_class_r = multiclass_recall(preds, truth, average="none", **common)
    per_class_f1 = multiclass_f1_score(preds, truth, average="none", **common)
    return EvalResult(
        loss=total_loss / samples,
        accuracy=float((preds == truth).float().mean()),
        top5=top5_hits / samples if num_classes > 5 else None,
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
