"""The load-time serving plan: a timed choice of layout and batch cap that never changes the scores."""

from __future__ import annotations

import time

import pytest
import torch

from app.services import serving_plan
from app.services.serving_plan import plan_serving
from models.predictor import Predictor
from tests.checkpoints import checkpoint_bytes


@pytest.fixture(autouse=True)
def _forget() -> None:
    serving_plan._remembered.clear()


def images(count: int, channels: int = 1, size: int = 28) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=generator)
        for _ in range(count)
    ]


def test_the_plan_times_both_layouts_and_growing_batches_and_keeps_its_choice() -> None:
    predictor = Predictor(checkpoint_bytes(seed=0))
    plan = plan_serving(predictor, max_batch_size=16, budget_seconds=30)
    assert {
        "contiguous@4",
        "channels_last@4",
        "contiguous@1" if not plan.channels_last else "channels_last@1",
    } <= set(plan.images_per_second)
    assert plan.max_batch_size in {1, 2, 4, 8, 16}
    layout = "channels_last" if plan.channels_last else "contiguous"
    chosen = plan.images_per_second[f"{layout}@{plan.max_batch_size}"]
    tried = [rate for key, rate in plan.images_per_second.items() if key.startswith(layout)]
    assert chosen >= max(tried) * 0.95  # the chosen cap is (within 5%) the fastest per image
    assert predictor.memory_format == (torch.channels_last if plan.channels_last else torch.contiguous_format)
    assert layout in plan.summary() and "budget" not in plan.reason


def test_the_cap_is_never_exceeded_and_no_budget_means_no_trial() -> None:
    predictor = Predictor(checkpoint_bytes(seed=0))
    assert plan_serving(predictor, max_batch_size=3, budget_seconds=30).max_batch_size <= 3
    untimed = plan_serving(predictor, max_batch_size=32, budget_seconds=0)
    assert (untimed.channels_last, untimed.max_batch_size, untimed.images_per_second) == (False, 32, {})


def test_both_layouts_give_the_same_scores() -> None:
    predictor = Predictor(checkpoint_bytes(seed=1, architecture="resnet18", image_size=32, channels=3))
    batch = images(5, channels=3, size=32)
    plain = predictor.probabilities_of(batch)
    predictor.set_channels_last(True)
    assert torch.allclose(predictor.probabilities_of(batch), plain, atol=1e-5)
    predictor.set_channels_last(False)
    assert torch.equal(predictor.probabilities_of(batch), plain)


def test_a_plan_is_remembered_for_the_next_checkpoint_of_the_same_network() -> None:
    first = Predictor(checkpoint_bytes(seed=0))
    plan = plan_serving(first, max_batch_size=8, budget_seconds=30)
    newer = Predictor(checkpoint_bytes(seed=1))  # a later best checkpoint: same architecture and shape
    started = time.perf_counter()
    assert plan_serving(newer, max_batch_size=8, budget_seconds=30) is plan
    assert time.perf_counter() - started < 0.05  # not timed again
    assert newer.memory_format == first.memory_format  # and put in the planned layout
    other_cap = plan_serving(newer, max_batch_size=4, budget_seconds=30)
    assert other_cap is not plan and other_cap.max_batch_size <= 4
