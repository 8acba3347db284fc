"""The training engine: early stopping, optimiser groups, schedules, augmentation, train and evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.preprocessing import Preprocessing, normalize
from workers.engine import (
    EarlyStopping,
    EvalResult,
    LRSchedule,
    Stopped,
    TrainResult,
    evaluate,
    make_optimizer,
    make_scheduler,
    param_groups,
    random_affine,
    resolve_device,
    train_one_epoch,
)

CPU = torch.device("cpu")
GRAY = Preprocessing(image_size=4, channels=1, mean=(0.5,), std=(0.5,))
IDENTITY_255 = Preprocessing(image_size=4, channels=1, mean=(0.0,), std=(1 / 255,))  # x -> x


# ---------------------------------------------------------------- EarlyStopping


def test_early_stopping_min_mode() -> None:
    tracker = EarlyStopping(mode="min", patience=2)
    assert tracker.update(1.0) is True
    assert tracker.update(0.8) is True
    assert tracker.best == 0.8
    assert tracker.update(0.8) is False, "equal is not better"
    assert not tracker.should_stop
    assert tracker.update(0.9) is False
    assert tracker.should_stop
    assert tracker.best == 0.8


def test_early_stopping_max_mode() -> None:
    tracker = EarlyStopping(mode="max", patience=1)
    assert tracker.update(0.5) is True
    assert tracker.update(0.4) is False
    assert tracker.should_stop
    assert tracker.update(0.6) is True, "an improvement resets the count"
    assert not tracker.should_stop
    assert tracker.best == 0.6


def test_early_stopping_patience_counts_consecutive_bad_epochs() -> None:
    tracker = EarlyStopping(mode="min", patience=3)
    for value in (5.0, 6.0, 7.0, 4.0, 4.5, 4.5):
        tracker.update(value)
    assert tracker.bad_epochs == 2
    assert not tracker.should_stop
    tracker.update(4.1)
    assert tracker.should_stop


@pytest.mark.parametrize(("mode", "values"), [("min", [1.0, 0.95, 0.91]), ("max", [0.5, 0.55, 0.59])])
def test_early_stopping_min_delta(mode: str, values: list[float]) -> None:
    tracker = EarlyStopping(mode=mode, patience=2, min_delta=0.1)
    assert tracker.update(values[0])
    assert not tracker.update(values[1]), "an improvement smaller than min_delta does not count"
    assert not tracker.update(values[2])
    assert tracker.best == values[0]
    assert tracker.should_stop
    assert tracker.update(values[0] + (-0.2 if mode == "min" else 0.2))
    assert tracker.bad_epochs == 0


def test_early_stopping_without_patience_never_stops() -> None:
    tracker = EarlyStopping(mode="min", patience=None)
    tracker.update(1.0)
    for _ in range(100):
        assert not tracker.update(2.0)
    assert not tracker.should_stop


# ---------------------------------------------------------------- optimiser and schedules


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
        nn.LayerNorm(3),
    )


def test_param_groups_put_one_dimensional_params_in_the_no_decay_group() -> None:
    model = small_net()
    decay_group, no_decay_group = param_groups(model, 5e-4)
    assert decay_group["weight_decay"] == 5e-4
    assert no_decay_group["weight_decay"] == 0.0
    conv, bn, _, _, linear, ln = model
    assert {id(p) for p in decay_group["params"]} == {id(conv.weight), id(linear.weight)}
    assert {id(p) for p in no_decay_group["params"]} == {
        id(conv.bias),
        id(bn.weight),
        id(bn.bias),
        id(linear.bias),
        id(ln.weight),
        id(ln.bias),
    }


@pytest.mark.parametrize(
    ("name", "kind"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_make_optimizer(name: str, kind: type) -> None:
    optimizer = make_optimizer(small_net(), name=name, lr=0.05, momentum=0.8, weight_decay=0.01)
    assert isinstance(optimizer, kind)
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.05]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.8


def test_make_optimizer_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="lion"):
        make_optimizer(small_net(), name="lion", lr=0.1, momentum=0.0, weight_decay=0.0)


def lr_per_epoch(name: str, epochs: int, *, step_size: int = 2, gamma: float = 0.1) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, name=name, epochs=epochs, step_size=step_size, gamma=gamma)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


def test_cosine_schedule_over_epochs() -> None:
    epochs = 5
    expected = [0.05 * (1 + math.cos(math.pi * epoch / epochs)) for epoch in range(epochs)]
    assert lr_per_epoch("cosine", epochs) == pytest.approx(expected)
    assert lr_per_epoch("cosine", epochs)[0] == pytest.approx(0.1)


def test_step_schedule_over_epochs() -> None:
    assert lr_per_epoch("step", 6, step_size=2, gamma=0.5) == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    )


def test_no_schedule_keeps_the_lr() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert make_scheduler(optimizer, name="none", epochs=3, step_size=1, gamma=0.1) is None
    assert lr_per_epoch("none", 3) == [0.1, 0.1, 0.1]


def test_make_scheduler_rejects_unknown_names() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="sawtooth"):
        make_scheduler(optimizer, name="sawtooth", epochs=3, step_size=1, gamma=0.1)


def test_warmup_then_the_main_schedule() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    main = make_scheduler(optimizer, name="step", epochs=4, step_size=1, gamma=0.5)
    schedule = LRSchedule(optimizer, main, warmup_epochs=2)
    lrs = []
    for epoch in range(1, 6):
        lrs.append(schedule.epoch_start(epoch))
        optimizer.step()
        schedule.epoch_end(epoch, monitored=0.0)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05, 0.025])


def test_plateau_schedule_follows_the_monitored_metric() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    main = make_scheduler(
        optimizer, name="plateau", epochs=10, gamma=0.5, plateau_patience=1, plateau_mode="max"
    )
    schedule = LRSchedule(optimizer, main)
    lrs = []
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.6, 0.7], start=1):
        lrs.append(schedule.epoch_start(epoch))
        optimizer.step()
        schedule.epoch_end(epoch, monitored=accuracy)
    lrs.append(schedule.epoch_start(6))
    # two epochs without improvement (patience 1) halve the lr once
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05])


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- random_affine


def random_batch(n: int = 6, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flip", [False, True])
def test_random_affine_keeps_shape_dtype_and_range(flip: bool) -> None:
    batch = random_batch()
    out = random_affine(batch, generator=torch.Generator().manual_seed(1), horizontal_flip=flip)
    assert out.shape == batch.shape
    assert out.dtype == batch.dtype
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0 + 1e-6
    assert not torch.equal(out, batch)


@pytest.mark.parametrize("flip", [False, True])
def test_random_affine_is_deterministic_for_a_seed(flip: bool) -> None:
    batch = random_batch()
    first = random_affine(batch, generator=torch.Generator().manual_seed(7), horizontal_flip=flip)
    second = random_affine(batch, generator=torch.Generator().manual_seed(7), horizontal_flip=flip)
    other = random_affine(batch, generator=torch.Generator().manual_seed(8), horizontal_flip=flip)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_random_affine_transforms_each_image_differently() -> None:
    batch = random_batch(n=4, seed=3)[:1].repeat(4, 1, 1, 1)
    out = random_affine(batch, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], out[1])
    assert not torch.equal(out[2], out[3])


def test_random_affine_with_no_range_is_the_identity() -> None:
    batch = random_batch()
    out = random_affine(
        batch,
        generator=torch.Generator().manual_seed(0),
        max_rotation_deg=0.0,
        scale=(1.0, 1.0),
        max_shift=0.0,
    )
    torch.testing.assert_close(out, batch, rtol=0, atol=1e-5)


def test_random_affine_flip_only_mirrors_some_images() -> None:
    batch = random_batch(n=32)
    out = random_affine(
        batch,
        generator=torch.Generator().manual_seed(0),
        max_rotation_deg=0.0,
        scale=(1.0, 1.0),
        max_shift=0.0,
        horizontal_flip=True,
    )
    flipped = 0
    for original, result in zip(batch, out, strict=True):
        if torch.allclose(result, original.flip(-1), atol=1e-5):
            flipped += 1
        else:
            torch.testing.assert_close(result, original, rtol=0, atol=1e-5)
    assert 0 < flipped < 32


# ---------------------------------------------------------------- train_one_epoch


def separable_dataset(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 4, 4) images: class 0 dark, class 1 bright, with noise."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 2
    base = torch.where(targets.view(-1, 1, 1, 1) == 1, 180, 40)
    noise = torch.randint(0, 60, (n, 1, 4, 4), generator=generator)
    return (base + noise).to(torch.uint8), targets


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    *,
    batch_size: int = 4,
    seed: int = 0,
    augment: object = None,
    on_batch: object = None,
) -> TrainResult:
    return train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        images,
        targets,
        indices,
        batch_size=batch_size,
        preprocessing=GRAY,
        device=CPU,
        generator=torch.Generator().manual_seed(seed),
        augment=augment,  # type: ignore[arg-type]
        on_batch=on_batch or (lambda _batch, _batches: None),  # type: ignore[arg-type]
    )


def test_train_one_epoch_lowers_the_loss_on_separable_data() -> None:
    images, targets = separable_dataset()
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    indices = torch.arange(len(targets))
    losses = [run_epoch(model, optimizer, images, targets, indices, seed=epoch).loss for epoch in range(6)]
    assert losses[-1] < losses[0] / 2
    final = run_epoch(model, optimizer, images, targets, indices, seed=99)
    assert final.accuracy == 1.0
    assert model.training


def test_train_one_epoch_reports_the_sample_weighted_loss() -> None:
    """With lr=0 the model does not move, so the epoch loss must equal the loss over the whole set;
    10 samples in batches of 4 (4, 4, 2) would give a different number if batches were averaged."""
    images, targets = separable_dataset(n=12)
    targets = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0])  # some right, some wrong
    indices = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 10, 11])
    model = linear_model(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    calls: list[tuple[int, int]] = []
    result = run_epoch(
        model, optimizer, images, targets, indices, batch_size=4, on_batch=lambda b, n: calls.append((b, n))
    )
    with torch.no_grad():
        logits = model(normalize(images[indices], GRAY))
        expected_loss = F.cross_entropy(logits, targets[indices]).item()
        expected_accuracy = (logits.argmax(dim=1) == targets[indices]).float().mean().item()
    assert result.samples == 10
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.accuracy == pytest.approx(expected_accuracy)
    assert 0 < result.accuracy < 1, "the check needs a mix of right and wrong predictions"
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert result.seconds > 0
    assert 0 <= result.data_seconds <= result.seconds
    assert result.images_per_second == pytest.approx(10 / result.seconds)


def test_sample_weighted_loss_differs_from_the_mean_of_batch_means() -> None:
    """Guards the previous test: for this data the naive average is a different number."""
    images, _ = separable_dataset(n=12)
    targets = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0])
    indices = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 10, 11])
    model = linear_model(seed=3)
    order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        batch_means = [
            F.cross_entropy(model(normalize(images[ids], GRAY)), targets[ids]).item()
            for ids in order.split(4)
        ]
        whole = F.cross_entropy(model(normalize(images[indices], GRAY)), targets[indices]).item()
    assert abs(sum(batch_means) / len(batch_means) - whole) > 1e-4


def test_train_one_epoch_only_uses_the_given_indices() -> None:
    images, targets = separable_dataset(n=20)
    images[10:] = 0  # poison: would be visible in the loss if used
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = run_epoch(model, optimizer, images, targets, torch.arange(10), batch_size=3)
    with torch.no_grad():
        expected = F.cross_entropy(model(normalize(images[:10], GRAY)), targets[:10]).item()
    assert result.samples == 10
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_train_one_epoch_is_deterministic_for_a_seed() -> None:
    images, targets = separable_dataset()
    results = []
    for _ in range(2):
        model = linear_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        result = run_epoch(model, optimizer, images, targets, torch.arange(40), batch_size=7, seed=5)
        results.append((result.loss, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


class IndexRecorder(nn.Module):
    """Records which images it sees: image i holds the value i in every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x[:, 0, 0, 0].round().int().tolist()
        return self.linear(x[:, 0, 0, :1])


def seen_order(seed: int, indices: torch.Tensor) -> list[int]:
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 4, 4).contiguous()
    targets = torch.zeros(30, dtype=torch.long)
    model = IndexRecorder()
    train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.0),
        images,
        targets,
        indices,
        batch_size=4,
        preprocessing=IDENTITY_255,
        device=CPU,
        generator=torch.Generator().manual_seed(seed),
        augment=None,
        on_batch=lambda _batch, _batches: None,
    )
    return model.seen


def test_train_one_epoch_visits_each_index_once_in_a_seeded_random_order() -> None:
    indices = torch.arange(3, 28)
    first = seen_order(0, indices)
    assert sorted(first) == indices.tolist(), "every index exactly once, nothing else"
    assert first != indices.tolist(), "shuffled"
    assert seen_order(0, indices) == first
    assert seen_order(1, indices) != first


def test_gradient_accumulation_equals_one_larger_batch() -> None:
    """Plain SGD: two accumulated batches of 4 make the same step as one batch of 8."""
    images, targets = separable_dataset(n=8)
    params = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        model = linear_model(seed=1)
        steps: list[int] = []
        train_one_epoch(
            model,
            nn.CrossEntropyLoss(),
            torch.optim.SGD(model.parameters(), lr=0.5),
            images,
            targets,
            torch.arange(8),
            batch_size=batch_size,
            preprocessing=GRAY,
            device=CPU,
            generator=torch.Generator().manual_seed(0),
            augment=None,
            on_batch=lambda _batch, _batches: None,
            accumulate_steps=accumulate,
            on_optimizer_step=lambda steps=steps: steps.append(1),
        )
        assert len(steps) == 1
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(
        params[0], torch.cat([p.detach().flatten() for p in linear_model(seed=1).parameters()])
    )
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("accumulate", "expected_steps"), [(1, 3), (2, 2), (3, 1), (5, 1)])
def test_accumulation_steps_once_per_group_and_after_the_last_batch(
    accumulate: int, expected_steps: int
) -> None:
    images, targets = separable_dataset(n=10)
    model = linear_model()
    steps: list[int] = []
    train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.1),
        images,
        targets,
        torch.arange(10),
        batch_size=4,  # batches of 4, 4, 2
        preprocessing=GRAY,
        device=CPU,
        generator=torch.Generator().manual_seed(0),
        augment=None,
        on_batch=lambda _batch, _batches: None,
        accumulate_steps=accumulate,
        on_optimizer_step=lambda: steps.append(1),
    )
    assert len(steps) == expected_steps
    assert all(p.grad is None for p in model.parameters()), "no gradient is left over for the next epoch"


def test_train_one_epoch_applies_the_augmentation_to_unit_range_floats() -> None:
    images, targets = separable_dataset(n=10)
    seen: list[torch.Tensor] = []

    def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        assert isinstance(generator, torch.Generator)
        seen.append(batch.clone())
        return batch

    model = linear_model()
    plain = run_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), images, targets, torch.arange(10))
    augmented = run_epoch(
        model, torch.optim.SGD(model.parameters(), lr=0.0), images, targets, torch.arange(10), augment=augment
    )
    assert len(seen) == 3
    batch = torch.cat(seen)
    assert batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0
    assert float(batch.max()) <= 1.0
    assert augmented.loss == pytest.approx(plain.loss, rel=1e-5), "an identity augmentation changes nothing"


def test_train_one_epoch_lets_a_stop_escape_from_on_batch() -> None:
    images, targets = separable_dataset(n=10)
    model = linear_model()

    def on_batch(batch: int, _batches: int) -> None:
        if batch == 2:
            raise Stopped("cancelled")

    with pytest.raises(Stopped) as caught:
        run_epoch(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            images,
            targets,
            torch.arange(10),
            on_batch=on_batch,
        )
    assert caught.value.reason == "cancelled"


# ---------------------------------------------------------------- evaluate


class OneHotEcho(nn.Module):
    """A 'perfect' model: the input is the one-hot target, returned as logits (optionally shifted)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        logits = x.flatten(1) * 10.0
        if self.shift:
            # the true class second best, the next one first
            logits = logits + logits.roll(self.shift, dims=1) * 1.5
        return logits


def one_hot_dataset(num_classes: int, per_class: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.cat([torch.full((count,), label) for label, count in enumerate(per_class)])
    images = (F.one_hot(targets, num_classes) * 255).to(torch.uint8).view(-1, 1, 1, num_classes)
    return images, targets


def run_evaluate(model: nn.Module, num_classes: int, per_class: list[int], batch_size: int = 4) -> EvalResult:
    images, targets = one_hot_dataset(num_classes, per_class)
    return evaluate(
        model,
        nn.CrossEntropyLoss(),
        images,
        targets,
        torch.arange(len(targets)),
        num_classes=num_classes,
        batch_size=batch_size,
        preprocessing=Preprocessing(image_size=1, channels=1, mean=(0.0,), std=(1.0,)),
        device=CPU,
    )


def test_evaluate_a_perfect_model() -> None:
    per_class = [3, 5, 2, 4]
    model = OneHotEcho()
    result = run_evaluate(model, 4, per_class, batch_size=5)  # 14 samples: batches of 5, 5, 4
    assert result.samples == 14
    assert result.accuracy == 1.0
    assert result.precision == result.recall == result.f1 == 1.0
    assert torch.equal(result.confusion, torch.diag(torch.tensor(per_class)))
    assert result.per_class_recall.tolist() == [1.0] * 4
    assert result.per_class_precision.tolist() == [1.0] * 4
    assert result.per_class_f1.tolist() == [1.0] * 4
    expected_loss = F.cross_entropy(torch.tensor([[10.0, 0.0, 0.0, 0.0]]), torch.tensor([0])).item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.top5 is None, "top-5 is meaningless with 5 classes or fewer"


def test_evaluate_top5_is_none_with_five_classes() -> None:
    assert run_evaluate(OneHotEcho(), 5, [1] * 5).top5 is None


def test_evaluate_top5_with_more_than_five_classes() -> None:
    per_class = [2, 1, 3, 1, 1, 2, 2]
    result = run_evaluate(OneHotEcho(shift=1), 7, per_class, batch_size=3)
    assert result.accuracy == 0.0, "every top-1 prediction is the next class"
    assert result.top5 == 1.0, "the true class is always second"
    expected_confusion = torch.zeros(7, 7, dtype=torch.long)
    for label, count in enumerate(per_class):
        expected_confusion[label, (label + 1) % 7] = count
    assert torch.equal(result.confusion, expected_confusion)
    assert result.precision == result.recall == result.f1 == 0.0


def test_evaluate_macro_metrics_on_a_partly_wrong_model() -> None:
    class AlwaysZero(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)

    result = run_evaluate(AlwaysZero(), 3, [2, 1, 1])
    assert result.accuracy == 0.5
    assert result.confusion.tolist() == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert result.recall == pytest.approx((1.0 + 0 + 0) / 3)
    assert result.precision == pytest.approx((0.5 + 0 + 0) / 3)
    assert result.f1 == pytest.approx((2 / 3) / 3)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_runs_in_eval_mode_and_restores_the_mode(training: bool) -> None:
    model = OneHotEcho()
    model.train(training)
    run_evaluate(model, 3, [2, 2, 2])
    assert model.modes and not any(model.modes), "evaluation runs in eval mode"
    assert model.training is training


def test_evaluate_does_not_track_gradients() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.grad_enabled: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.grad_enabled.append(torch.is_grad_enabled())
            return self.linear(x.flatten(1))

    probe = Probe()
    run_evaluate(probe, 3, [1, 1, 1])
    assert probe.grad_enabled == [False]
    assert all(p.grad is None for p in probe.parameters())


def test_restored_adam_moments_take_their_channels_last_parameters_layout() -> None:
    """Fused AdamW walks a parameter and its moments as flat arrays: a resumed channels_last model with
    contiguous moments (as a checkpoint stores them) must step exactly like the uninterrupted one."""
    from workers.resume import match_state_layouts

    def two_steps(restore_contiguous: bool) -> torch.Tensor:
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
        optimizer = make_optimizer(conv, name="adamw", lr=0.1, momentum=0.9, weight_decay=0.0)
        inputs = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
        for step in range(2):
            optimizer.zero_grad()
            conv(inputs).square().mean().backward()
            optimizer.step()
            if step == 0 and restore_contiguous:
                saved = optimizer.state_dict()
                for values in saved["state"].values():
                    for name, value in list(values.items()):
                        if value.dim() == 4:
                            values[name] = value.contiguous()
                optimizer.load_state_dict(saved)
                match_state_layouts(optimizer)
        return conv.weight.detach().contiguous()

    assert torch.equal(two_steps(restore_contiguous=True), two_steps(restore_contiguous=False))
