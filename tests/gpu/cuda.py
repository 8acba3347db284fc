"""What the GPU tests need: `pytest -m gpu` selects them, and without CUDA they skip saying why."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

NO_CUDA = (
    "needs a CUDA GPU, and torch.cuda.is_available() is False here: run `pytest -m gpu` (or "
    "bench/gpu_check.sh, docs/gpu.md) on a GPU machine"
)

# Every module here: `pytestmark = cuda.REQUIRED`.
REQUIRED = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def gpus(count: int) -> pytest.MarkDecorator:
    """Skip unless this many GPUs are visible."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(visible < count, reason=f"needs {count} CUDA GPUs; {visible} visible here")


def bf16_autocast() -> tuple[str, bool]:
    """What a job's `mixed_precision: auto` resolves to on this GPU: (info's dtype, grad scaler)."""
    return ("bfloat16", False) if torch.cuda.is_bf16_supported() else ("float16", True)


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """`torch.backends.cudnn.benchmark` set for the block, then put back (it is process-wide)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
