"""Batches on the training device, from a dataset already decoded to uint8.

On the GPU the whole dataset is copied into GPU memory when it fits, and a batch is one gather there;
otherwise batches are gathered one ahead by a background thread into pinned host buffers and copied
without blocking. On the CPU the memory-mapped cache is indexed directly: the page cache is the copy.
No DataLoader worker processes: with decoding done once, ahead of training, they would only add copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def place_on_device(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device, *, max_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Move the whole dataset into GPU memory when it takes at most `max_fraction` of what is free:
    then a batch is one gather on the GPU, with no host copy at all. On the CPU the memory map is used
    as it is (the page cache is the resident copy)."""
    if device.type != "cuda":
        return images, targets, "memory-mapped"
    free, _total = torch.cuda.mem_get_info(device)
    if images.numel() <= max_fraction * free:
        return images.to(device), targets.to(device), "resident on the device"
    return images, targets, "pinned host buffers, prefetched"


def iterate_batches(
    images: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    prefetch: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, targets) on `device`, batch by batch in `order`.

    Data already on the device is gathered there. Data in host memory bound for a GPU is gathered one
    batch ahead by a background thread (index_select releases the GIL) into pinned buffers and copied
    without blocking; `prefetch` forces that path (tests run it on the CPU).
    """
    batches = math.ceil(len(order) / batch_size)
    if prefetch is None:
        prefetch = images.device != device
    if not prefetch:
        order = order.to(images.device)
        targets_here = targets.to(images.device)
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            yield (
                images[ids].to(device, non_blocking=True),
                targets_here[ids].to(device, non_blocking=True),
            )
        return
    yield from _prefetched(images, targets, order.cpu(), batches, batch_size, device)


def _prefetched(
    images: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    batches: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pin = device.type == "cuda"
    # Two staging buffers: one being copied to the device while the thread fills the other.
    buffers = [
        torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype, pin_memory=pin) for _ in range(2)
    ]
    copied: list[torch.cuda.Event | None] = [None, None]

    def gather(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = order[index * batch_size : (index + 1) * batch_size]
        buffer = buffers[index % 2][: len(ids)]
        torch.index_select(images, 0, ids, out=buffer)
        return buffer, targets[ids]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch") as pool:
        pending = pool.submit(gather, 0)
        for index in range(batches):
            buffer, target = pending.result()
            if index + 1 < batches:
                event = copied[(index + 1) % 2]
                if event is not None:
                    event.synchronize()  # the copy out of that buffer (two batches back) has finished
                pending = pool.submit(gather, index + 1)
            if pin:
                batch = buffer.to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                copied[index % 2] = event
            else:
                batch = buffer.clone()  # the buffer is refilled two batches on
            yield batch, target.to(device, non_blocking=pin)
