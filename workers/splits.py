"""Stratified, seeded train/val/test splits, honouring splits fixed by an archive's folders."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def _allocate(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) counts for a class of n images: rounded, but each split gets one image when it can."""
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    while n_val + n_test >= n and (n_val or n_test):  # keep at least one training image
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def stratified_split(
    labels: Sequence[int],
    fixed: Sequence[str | None],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[int]]:
    """Indices per split. Images with a fixed split keep it; the others are split per class.

    When the fixed splits leave validation empty (a zip with only `train/` and `test/`), validation
    is carved out of the training images the same way, so every job has a validation set.
    """
    rng = random.Random(seed)
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    free: dict[int, list[int]] = defaultdict(list)
    for index, (label, split) in enumerate(zip(labels, fixed, strict=True)):
        if split is None:
            free[label].append(index)
        else:
            result[split].append(index)

    for label in sorted(free):
        members = free[label]
        rng.shuffle(members)
        n_val, n_test = _allocate(len(members), val_fraction, test_fraction)
        result["val"] += members[:n_val]
        result["test"] += members[n_val : n_val + n_test]
        result["train"] += members[n_val + n_test :]

    if not result["val"] and result["train"]:
        by_label: dict[int, list[int]] = defaultdict(list)
        for index in result["train"]:
            by_label[labels[index]].append(index)
        result["train"] = []
        for label in sorted(by_label):
            members = sorted(by_label[label])
            rng.shuffle(members)
            n_val, _ = _allocate(len(members), val_fraction, 0.0)
            result["val"] += members[:n_val]
            result["train"] += members[n_val:]

    return {name: sorted(indices) for name, indices in result.items()}
