"""Batches on the device: the prefetching path yields exactly what plain indexing does."""

from __future__ import annotations

import pytest
import torch

from workers.batches import iterate_batches, place_on_device

CPU = torch.device("cpu")


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_follow_the_order_with_a_short_last_batch(prefetch: bool) -> None:
    images = torch.arange(23 * 2 * 3 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(23, 2, 3, 3)
    targets = torch.arange(23) % 5
    order = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    batches = list(iterate_batches(images, targets, order, batch_size=4, device=CPU, prefetch=prefetch))
    assert [len(target) for _, target in batches] == [4, 4, 4, 4, 4, 3]
    assert torch.equal(torch.cat([batch for batch, _ in batches]), images[order])
    assert torch.equal(torch.cat([target for _, target in batches]), targets[order])


def test_prefetched_batches_are_not_overwritten_by_later_ones() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    kept = list(
        iterate_batches(images, torch.zeros(10), torch.arange(10), batch_size=2, device=CPU, prefetch=True)
    )
    assert [batch.flatten().tolist() for batch, _ in kept] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_on_the_cpu_the_memory_map_is_used_as_it_is() -> None:
    images, targets = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    placed, placed_targets, placement = place_on_device(images, targets, CPU, max_fraction=0.5)
    assert placed is images and placed_targets is targets and placement == "memory-mapped"
