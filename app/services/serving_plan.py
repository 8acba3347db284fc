"""How a loaded model serves fastest on this CPU: memory layout and largest useful batch, by timing.

Both depend on the network and the machine, so they are measured once, when a checkpoint is loaded:
resnet18 on one core of these machines runs 26 images/s at batch 8 in the default layout and 34 in
channels_last, and past batch 8 it gets slower (its activations stop fitting in cache), while a small
network gains up to batch 32 and more. The dynamic batcher then never builds batches past the best size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from models.predictor import Predictor

NEAR_BEST = 0.95  # a larger batch must beat the best so far by this margin to be chosen


@dataclass(frozen=True)
class ServingPlan:
    channels_last: bool
    max_batch_size: int
    images_per_second: dict[str, float] = field(default_factory=dict)  # per tried (layout, batch)
    reason: str = "not timed"

    def summary(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{layout}, batches of up to {self.max_batch_size} ({self.reason})"


def _rate(predictor: Predictor, inputs: list[torch.Tensor]) -> float:
    predictor.probabilities_of(inputs)  # warm-up: oneDNN builds its kernels for this shape
    started = time.perf_counter()
    predictor.probabilities_of(inputs)
    return len(inputs) / (time.perf_counter() - started)


_remembered: dict[tuple[object, ...], ServingPlan] = {}


def plan_serving(predictor: Predictor, *, max_batch_size: int, budget_seconds: float) -> ServingPlan:
    """Time the layouts at a small batch, then batches 1, 2, 4, … up to `max_batch_size` in the faster
    layout until one is clearly slower per image than the best so far, or the budget is spent. Runs with
    the calling thread's torch thread count (set it to what batches will run with). Leaves
    `predictor` in the chosen layout.

    A plan is remembered per (architecture, input shape, classes, threads, cap) for the life of the
    process: a running job's every newer best checkpoint replaces the cached model, and timing the same
    network again would hold its waiting requests for seconds each time."""
    if predictor.device.type != "cpu" or budget_seconds <= 0:
        return ServingPlan(channels_last=False, max_batch_size=max_batch_size)
    pre = predictor.preprocessing
    key = (
        predictor.meta["architecture"],
        pre.channels,
        pre.image_size,
        len(predictor.classes),
        torch.get_num_threads(),
        max_batch_size,
    )
    plan = _remembered.get(key)
    if plan is None:
        plan = _remembered[key] = _timed_plan(predictor, max_batch_size, budget_seconds)
    predictor.set_channels_last(plan.channels_last)
    return plan


def _timed_plan(predictor: Predictor, max_batch_size: int, budget_seconds: float) -> ServingPlan:
    deadline = time.perf_counter() + budget_seconds
    pre = predictor.preprocessing
    sample = torch.randint(0, 256, (pre.channels, pre.image_size, pre.image_size), dtype=torch.uint8)
    rates: dict[str, float] = {}
    probe = min(4, max_batch_size)
    layouts: dict[bool, float] = {}
    for channels_last in (False, True):
        predictor.set_channels_last(channels_last)
        layouts[channels_last] = rates[f"{'channels_last' if channels_last else 'contiguous'}@{probe}"] = (
            _rate(predictor, [sample] * probe)
        )
        if time.perf_counter() > deadline:
            break
    channels_last = len(layouts) == 2 and layouts[True] > layouts[False] * 1.03
    predictor.set_channels_last(channels_last)
    layout = "channels_last" if channels_last else "contiguous"
    # Images/s per batch size in the chosen layout; the probe above is one of them.
    sweep = {probe: layouts[channels_last]} if channels_last in layouts else {}
    batch, out_of_time = 1, False
    while batch <= max_batch_size:
        if time.perf_counter() >= deadline:
            out_of_time = True
            break
        if batch not in sweep:
            sweep[batch] = _rate(predictor, [sample] * batch)
        if sweep[batch] < max(rate for size, rate in sweep.items() if size <= batch) * NEAR_BEST:
            break  # past the cache sweet spot: larger batches only get slower
        batch *= 2
    rates.update({f"{layout}@{size}": rate for size, rate in sweep.items()})
    best_batch, best_rate = 1, 0.0
    for size in sorted(sweep):  # every measured size, the probe included even when the sweep stopped first
        if sweep[size] > best_rate / NEAR_BEST:
            best_batch, best_rate = size, sweep[size]
    reason = f"timed {len(rates)} passes"
    if out_of_time:
        reason += f"; stopped by the {budget_seconds:g} s budget"
    return ServingPlan(channels_last, best_batch, rates, reason)
