"""Pick the fastest CPU training step format (memory layout x autocast dtype) by timing it.

On the CPU, oneDNN's channels_last kernels and its AMX/AVX-512 bf16 kernels make some networks two to
three times faster (simple_cnn: 1,600 → 4,400 images/s here) and others slower (depthwise convolutions
in bf16), so no fixed rule is right. Like `cudnn.benchmark` on the GPU, the worker times a few steps of
each candidate on a throwaway copy of the model and keeps the fastest; the choice is remembered per
(model, input shape, batch size, threads) for the life of the worker process.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepFormat:
    channels_last: bool
    autocast_dtype: torch.dtype | None

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        precision = str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32"
        return f"{layout}+{precision}"


@dataclass(frozen=True)
class Choice:
    chosen: StepFormat
    images_per_second: dict[str, float]  # per candidate label; empty when nothing was timed
    reason: str

    def summary(self) -> dict[str, object]:
        return {
            "chosen": self.chosen.label,
            "images_per_second": {label: round(rate, 1) for label, rate in self.images_per_second.items()},
            "reason": self.reason,
        }


_remembered: dict[tuple[object, ...], Choice] = {}


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 / AMX): without them bf16 is emulated, slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def candidates(default: StepFormat, *, try_bf16: bool) -> list[StepFormat]:
    """The default first (it wins ties), then the other layout, and bf16 of both when allowed."""
    dtypes = [default.autocast_dtype]
    if try_bf16 and default.autocast_dtype is None:
        dtypes.append(torch.bfloat16)
    formats = [StepFormat(layout, dtype) for dtype in dtypes for layout in (False, True)]
    return [default, *[f for f in formats if f != default]]


def _step_seconds(
    model: nn.Module,
    make_optimizer: OptimizerFactory,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    step_format: StepFormat,
    *,
    steps: int,
    deadline: float,
) -> float | None:
    """Seconds per training step of a copy of `model` in `step_format` (after one untimed warm-up
    step), or None when the deadline passed first."""
    trial = copy.deepcopy(model).train()
    memory_format = torch.channels_last if step_format.channels_last else torch.contiguous_format
    trial = trial.to(memory_format=memory_format)
    optimizer = make_optimizer(trial)
    criterion = nn.CrossEntropyLoss()
    batch = inputs.contiguous(memory_format=memory_format)

    def step() -> None:
        dtype = step_format.autocast_dtype
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = criterion(trial(batch).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    if time.perf_counter() > deadline:
        return None
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def choose_cpu_step_format(
    model: nn.Module,
    make_optimizer: OptimizerFactory,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    default: StepFormat,
    try_bf16: bool,
    key: tuple[object, ...],
    budget_seconds: float,
    steps: int = 3,
) -> Choice:
    """The fastest of `candidates(default)` for one training step on `inputs` (a real batch), within
    `budget_seconds` of timing; the default when the budget runs out before a second candidate is timed
    (large models, where one step is already seconds). Remembered under `key`."""
    key = (*key, torch.get_num_threads(), default, try_bf16)
    if key in _remembered:
        return _remembered[key]
    deadline = time.perf_counter() + budget_seconds
    rates: dict[str, float] = {}
    best, best_seconds = default, float("inf")
    # The trial's dropout and the like draw from the global generator: restored afterwards, so a job's
    # result depends on its seed, not on whether this worker had tuned this shape before.
    with torch.random.fork_rng(devices=[]):
        for candidate in candidates(default, try_bf16=try_bf16):
            seconds = _step_seconds(
                model, make_optimizer, inputs, targets, candidate, steps=steps, deadline=deadline
            )
            if seconds is None:
                break
            rates[candidate.label] = len(inputs) / seconds
            if seconds < best_seconds * 0.97:  # a near tie keeps the earlier (default-first) candidate
                best, best_seconds = candidate, seconds
            if time.perf_counter() > deadline:
                break
    if len(rates) < 2:
        reason = f"one step takes too long to compare formats within {budget_seconds:g} s; kept the default"
        choice = Choice(default, rates, reason)
    else:
        choice = Choice(best, rates, f"fastest of {len(rates)} timed over {steps} steps each")
    _remembered[key] = choice
    return choice
