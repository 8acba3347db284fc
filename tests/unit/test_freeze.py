"""Freezing the backbone: frozen weights do not move at all (no weight decay, no momentum)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.preprocessing import Preprocessing
from models.registry import backbone_parameters, build_model, head_module
from workers.engine import make_optimizer, train_one_epoch
from workers.training import set_backbone_trainable


def one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 3, (48,), generator=generator)
    train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        images,
        targets,
        torch.arange(48),
        batch_size=16,
        preprocessing=Preprocessing(28, 1, (0.5,), (0.5,)),
        device=torch.device("cpu"),
        generator=generator,
        augment=None,
        on_batch=lambda _b, _n: None,
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "rmsprop"])
def test_frozen_backbone_does_not_move_then_trains_after_unfreezing(optimizer: str) -> None:
    torch.manual_seed(0)
    model = build_model("simple_cnn", num_classes=3, in_channels=1, image_size=28)
    opt = make_optimizer(model, name=optimizer, lr=0.05, momentum=0.9, weight_decay=0.1)
    backbone = backbone_parameters(model, "simple_cnn")
    head = list(head_module(model, "simple_cnn").parameters())

    one_epoch(model, opt)  # builds momentum for every parameter
    set_backbone_trainable(model, "simple_cnn", trainable=False)
    frozen = [p.detach().clone() for p in backbone]
    head_before = [p.detach().clone() for p in head]
    one_epoch(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(backbone, frozen, strict=True))
    assert all(p.grad is None for p in backbone)
    assert not all(torch.equal(p, q) for p, q in zip(head, head_before, strict=True))

    set_backbone_trainable(model, "simple_cnn", trainable=True)
    one_epoch(model, opt)
    assert not all(torch.equal(p, q) for p, q in zip(backbone, frozen, strict=True))
