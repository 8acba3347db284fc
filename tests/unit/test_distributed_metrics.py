"""Validation reduced across ranks is exact: metrics rebuilt from summed counts equal `evaluate`'s."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.preprocessing import Preprocessing
from workers.distributed import result_from_confusion
from workers.engine import evaluate


@pytest.mark.parametrize("num_classes", [3, 7])
def test_metrics_from_summed_shards_equal_one_pass_over_everything(num_classes: int) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (53, 1, 8, 8), dtype=torch.uint8)
    targets = torch.randint(0, num_classes, (53,))
    indices = torch.randperm(53)[:41]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    kwargs = {
        "num_classes": num_classes,
        "batch_size": 8,
        "preprocessing": Preprocessing.for_channels(image_size=8, channels=1, mean=(0.5,), std=(0.5,)),
        "device": torch.device("cpu"),
    }
    criterion = nn.CrossEntropyLoss()
    whole = evaluate(model, criterion, images, targets, indices, **kwargs)

    # Three "ranks", each every third sample, no padding; then what the all-reduce adds up.
    parts = [evaluate(model, criterion, images, targets, indices[r::3], **kwargs) for r in range(3)]
    confusion = sum(part.confusion for part in parts)
    loss_sum = sum(part.loss * part.samples for part in parts)
    top5 = round(sum((part.top5 or 0.0) * part.samples for part in parts))
    reduced = result_from_confusion(confusion, loss_sum=loss_sum, top5_hits=top5)

    assert reduced.samples == whole.samples == 41
    assert torch.equal(reduced.confusion, whole.confusion)
    assert reduced.accuracy == whole.accuracy
    assert reduced.loss == pytest.approx(whole.loss, rel=1e-6)
    assert reduced.top5 == whole.top5
    for name in ("precision", "recall", "f1"):
        assert getattr(reduced, name) == getattr(whole, name), name
        assert torch.equal(getattr(reduced, f"per_class_{name}"), getattr(whole, f"per_class_{name}"))
