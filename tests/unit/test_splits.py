"""`stratified_split`: per-class fractions, seeded determinism, fixed splits, tiny classes."""

from __future__ import annotations

from collections import Counter

import pytest

from workers.splits import SPLITS, stratified_split


def split(labels: list[int], fixed: list[str | None] | None = None, **kwargs: float) -> dict[str, list[int]]:
    options: dict[str, float] = {"val_fraction": 0.2, "test_fraction": 0.1, "seed": 0}
    options.update(kwargs)
    return stratified_split(
        labels,
        fixed if fixed is not None else [None] * len(labels),
        val_fraction=options["val_fraction"],
        test_fraction=options["test_fraction"],
        seed=int(options["seed"]),
    )


def per_class(result: dict[str, list[int]], labels: list[int]) -> dict[str, Counter[int]]:
    return {name: Counter(labels[i] for i in indices) for name, indices in result.items()}


def assert_partition(result: dict[str, list[int]], n: int) -> None:
    assert set(result) == set(SPLITS)
    everything = [i for name in SPLITS for i in result[name]]
    assert sorted(everything) == list(range(n)), "splits must be disjoint and cover every index"
    for indices in result.values():
        assert indices == sorted(indices)


def test_hundred_per_class_gives_exact_70_20_10() -> None:
    labels = [label for label in range(3) for _ in range(100)]
    result = split(labels)
    assert_partition(result, len(labels))
    counts = per_class(result, labels)
    for label in range(3):
        assert counts["train"][label] == 70
        assert counts["val"][label] == 20
        assert counts["test"][label] == 10


@pytest.mark.parametrize("sizes", [(37, 53, 11), (5, 200, 17, 9)])
def test_each_class_share_is_close_to_the_fractions(sizes: tuple[int, ...]) -> None:
    labels = [label for label, size in enumerate(sizes) for _ in range(size)]
    # interleave so that indices of a class are not contiguous
    labels = labels[::2] + labels[1::2]
    result = split(labels, val_fraction=0.25, test_fraction=0.15, seed=3)
    assert_partition(result, len(labels))
    counts = per_class(result, labels)
    for label, size in enumerate(sizes):
        assert abs(counts["val"][label] / size - 0.25) <= 1 / size
        assert abs(counts["test"][label] / size - 0.15) <= 1 / size
        assert counts["train"][label] >= 1


def test_same_seed_gives_the_same_split() -> None:
    labels = [i % 4 for i in range(200)]
    assert split(labels, seed=42) == split(labels, seed=42)


def test_different_seed_gives_a_different_split() -> None:
    labels = [i % 4 for i in range(200)]
    first, second = split(labels, seed=1), split(labels, seed=2)
    assert first["val"] != second["val"]
    assert first["test"] != second["test"]
    # ... but the same per-class counts
    assert per_class(first, labels) == per_class(second, labels)


def test_split_is_random_within_a_class_not_the_first_indices() -> None:
    labels = [0] * 100
    result = split(labels, seed=5)
    assert result["val"] != list(range(20))
    assert result["train"] != list(range(30, 100))


def test_fixed_splits_are_kept_and_the_rest_is_stratified() -> None:
    labels = [i % 2 for i in range(140)]
    fixed: list[str | None] = [None] * 140
    pinned = {0: "test", 1: "test", 2: "val", 3: "val", 4: "train", 5: "train", 6: "test", 7: "val"}
    for index, name in pinned.items():
        fixed[index] = name
    result = split(labels, fixed, seed=9)
    assert_partition(result, 140)
    for index, name in pinned.items():
        assert index in result[name]
    # the 132 free images (66 per class) are split by the fractions on their own
    free = [i for i in range(140) if fixed[i] is None]
    free_counts = per_class({k: [i for i in v if i in free] for k, v in result.items()}, labels)
    for label in range(2):
        assert free_counts["val"][label] == round(66 * 0.2)
        assert free_counts["test"][label] == round(66 * 0.1)


def test_fixed_splits_are_honoured_even_against_the_fractions() -> None:
    labels = [0] * 10
    fixed: list[str | None] = ["test"] * 5 + ["val"] * 5
    result = split(labels, fixed)
    assert result == {"train": [], "val": [5, 6, 7, 8, 9], "test": [0, 1, 2, 3, 4]}


def test_fixed_splits_without_val_carve_val_out_of_train_per_class() -> None:
    labels = [i % 2 for i in range(120)]
    fixed: list[str | None] = ["train" if i < 100 else "test" for i in range(120)]
    result = split(labels, fixed, val_fraction=0.2, seed=4)
    assert_partition(result, 120)
    assert result["test"] == list(range(100, 120)), "fixed test images stay in test"
    counts = per_class(result, labels)
    assert counts["val"] == Counter({0: 10, 1: 10})
    assert counts["train"] == Counter({0: 40, 1: 40})
    assert all(i < 100 for i in result["val"]), "val comes from the training images only"


def test_carved_val_is_seeded() -> None:
    labels = [i % 3 for i in range(90)]
    fixed: list[str | None] = ["train"] * 80 + ["test"] * 10
    assert split(labels, fixed, seed=1) == split(labels, fixed, seed=1)
    assert split(labels, fixed, seed=1)["val"] != split(labels, fixed, seed=2)["val"]


def test_val_is_not_carved_when_val_fraction_is_zero() -> None:
    labels = [i % 2 for i in range(20)]
    fixed: list[str | None] = ["train"] * 16 + ["test"] * 4
    result = split(labels, fixed, val_fraction=0.0)
    assert result["val"] == []
    assert result["train"] == list(range(16))


@pytest.mark.parametrize("seed", range(5))
def test_tiny_classes_keep_a_training_image_and_get_val_when_possible(seed: int) -> None:
    labels = [0, 1, 1, 2, 2, 2]  # classes of 1, 2 and 3 images
    result = split(labels, seed=seed)
    assert_partition(result, 6)
    counts = per_class(result, labels)
    assert counts["train"] == Counter({0: 1, 1: 1, 2: 1})
    assert counts["val"] == Counter({1: 1, 2: 1})
    assert counts["test"] == Counter({2: 1})


@pytest.mark.parametrize("n", range(1, 12))
@pytest.mark.parametrize(("val_fraction", "test_fraction"), [(0.2, 0.1), (0.5, 0.5), (0.9, 0.0), (0.0, 0.9)])
def test_every_class_keeps_at_least_one_training_image(
    n: int, val_fraction: float, test_fraction: float
) -> None:
    result = split([7] * n, val_fraction=val_fraction, test_fraction=test_fraction)
    assert_partition(result, n)
    assert len(result["train"]) >= 1
    if val_fraction > 0 and n >= 2:
        assert len(result["val"]) >= 1
    if val_fraction == 0:
        assert result["val"] == []
    if test_fraction == 0:
        assert result["test"] == []


def test_empty_input_gives_empty_splits() -> None:
    assert split([]) == {"train": [], "val": [], "test": []}
