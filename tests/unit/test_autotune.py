"""The CPU step-format trial: times real steps, picks the fastest, remembers it, and leaves no trace."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from models.registry import build_model
from workers import autotune
from workers.autotune import StepFormat, candidates, choose_cpu_step_format
from workers.engine import make_optimizer

FP32 = StepFormat(channels_last=False, autocast_dtype=None)


def adamw(module: nn.Module) -> torch.optim.Optimizer:
    return make_optimizer(module, name="adamw", lr=1e-3, momentum=0.9, weight_decay=1e-4)


@pytest.fixture(autouse=True)
def _forget() -> None:
    autotune._remembered.clear()


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, 1, 28, 28, generator=generator), torch.randint(
        0, 10, (size,), generator=generator
    )


def test_candidates_start_with_the_default_and_add_bf16_only_when_allowed() -> None:
    assert candidates(FP32, try_bf16=False) == [FP32, StepFormat(True, None)]
    assert candidates(FP32, try_bf16=True) == [
        FP32,
        StepFormat(True, None),
        StepFormat(False, torch.bfloat16),
        StepFormat(True, torch.bfloat16),
    ]
    bf16 = StepFormat(False, torch.bfloat16)  # asked for explicitly: only the layout varies
    assert candidates(bf16, try_bf16=True) == [bf16, StepFormat(True, torch.bfloat16)]


def test_the_trial_times_every_candidate_and_picks_the_fastest() -> None:
    model = build_model("simple_cnn", num_classes=10, in_channels=1, image_size=28)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    choice = choose_cpu_step_format(
        model, adamw, *batch(), default=FP32, try_bf16=True, key=("simple_cnn", 28), budget_seconds=60
    )
    assert set(choice.images_per_second) == {c.label for c in candidates(FP32, try_bf16=True)}
    fastest = max(choice.images_per_second.values())
    # The winner is the fastest, or the default within the 3% a near tie allows.
    assert choice.images_per_second[choice.chosen.label] >= fastest * 0.97
    summary = choice.summary()
    assert summary["chosen"] == choice.chosen.label and summary["reason"].startswith("fastest of 4")
    # The trial trained a copy: the model itself is untouched.
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_trial_leaves_the_random_stream_where_it_was() -> None:
    model = build_model("simple_cnn", num_classes=10, in_channels=1, image_size=28)  # has dropout
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    choose_cpu_step_format(
        model, adamw, *batch(), default=FP32, try_bf16=False, key=("k",), budget_seconds=60
    )
    assert torch.equal(torch.rand(5), expected)


def test_a_choice_is_remembered_per_shape() -> None:
    model = build_model("simple_cnn", num_classes=10, in_channels=1, image_size=28)
    first = choose_cpu_step_format(
        model, adamw, *batch(), default=FP32, try_bf16=False, key=("a",), budget_seconds=60
    )
    started = time.perf_counter()
    again = choose_cpu_step_format(
        model, adamw, *batch(), default=FP32, try_bf16=False, key=("a",), budget_seconds=60
    )
    assert again is first and time.perf_counter() - started < 0.05
    other = choose_cpu_step_format(
        model, adamw, *batch(), default=FP32, try_bf16=False, key=("b",), budget_seconds=60
    )
    assert other is not first


def test_a_step_slower_than_the_budget_keeps_the_default() -> None:
    model = build_model("simple_cnn", num_classes=10, in_channels=1, image_size=28)
    choice = choose_cpu_step_format(
        model, adamw, *batch(), default=FP32, try_bf16=True, key=("slow",), budget_seconds=0
    )
    assert choice.chosen == FP32
    assert choice.images_per_second == {}
    assert "kept the default" in choice.reason
