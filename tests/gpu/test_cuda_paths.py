"""The CUDA paths of the training step and of serving, each against its plain counterpart: the dataset in
GPU memory and through pinned prefetch buffers, fused optimisers, channels_last with bf16 autocast under
cudnn.benchmark, and the Predictor on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.predictor import Predictor
from models.preprocessing import decode_image
from models.registry import build_model
from tests.checkpoints import checkpoint_bytes
from tests.factories import noise_png
from tests.gpu import cuda
from workers.batches import iterate_batches, place_on_device
from workers.engine import make_optimizer, param_groups
from workers.resume import match_state_layouts

pytestmark = cuda.REQUIRED

CUDA = torch.device("cuda")


def dataset(count: int, size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


def test_a_dataset_that_fits_stays_in_gpu_memory_and_batches_are_gathered_there() -> None:
    images, targets = dataset(1000)
    on_device, targets_there, placement = place_on_device(images, targets, CUDA, max_fraction=0.5)
    assert placement == "resident on the device"
    assert on_device.device.type == "cuda" and targets_there.device.type == "cuda"
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    batches = list(iterate_batches(on_device, targets_there, order, batch_size=96, device=CUDA))
    assert len(batches) == 11  # the last one is short
    for index, (batch, target) in enumerate(batches):
        ids = order[index * 96 : (index + 1) * 96]
        assert batch.device.type == "cuda" and batch.dtype == torch.uint8
        assert torch.equal(batch.cpu(), images[ids]) and torch.equal(target.cpu(), targets[ids])


def test_a_dataset_that_does_not_fit_comes_through_pinned_buffers_without_mixing_batches() -> None:
    """Two staging buffers are refilled while earlier copies may still be running: every batch must
    arrive whole and in order, also when the consumer is slower than the gathering thread."""
    images, targets = dataset(6000, size=64)
    host, host_targets, placement = place_on_device(images, targets, CUDA, max_fraction=0.0)
    assert placement == "pinned host buffers, prefetched"
    assert host.device.type == "cpu"
    order = torch.randperm(6000, generator=torch.Generator().manual_seed(2))
    received = []
    for batch, target in iterate_batches(host, host_targets, order, batch_size=128, device=CUDA):
        assert batch.device.type == "cuda" and target.device.type == "cuda"
        torch.cuda._sleep(20_000_000)  # a slow step (~10 ms of GPU time): later copies queue behind it
        received.append((batch, target))
    torch.cuda.synchronize()
    assert len(received) == 47
    for index, (batch, target) in enumerate(received):
        ids = order[index * 128 : (index + 1) * 128]
        assert torch.equal(batch.cpu(), images[ids]), f"batch {index} differs from its images"
        assert torch.equal(target.cpu(), targets[ids])


def small_convnet() -> nn.Module:
    return build_model("resnet18", num_classes=10, in_channels=1, image_size=32).to(
        CUDA, memory_format=torch.channels_last
    )


def step_both(
    fused: torch.optim.Optimizer,
    model: nn.Module,
    reference: torch.optim.Optimizer,
    twin: nn.Module,
    seed: int,
) -> None:
    """One optimiser step of each with the same gradients (computed once, copied), so only the optimiser
    implementations differ."""
    torch.manual_seed(seed)
    inputs = torch.randn(8, 1, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(inputs), torch.randint(0, 10, (8,), device=CUDA)).backward()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        theirs.grad = mine.grad.clone() if mine.grad is not None else None
    fused.step()
    reference.step()


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimisers_step_channels_last_parameters_like_the_reference_also_after_a_restore(
    name: str,
) -> None:
    model = small_convnet()
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(model, name=name, lr=1e-2, momentum=0.9, weight_decay=1e-2)
    assert optimizer.defaults["fused"] is True
    reference_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    reference = reference_class(param_groups(twin, 1e-2), lr=1e-2, fused=False, foreach=False)
    for seed in range(3):
        step_both(optimizer, model, reference, twin, seed)

    # A resumed job: a new fused optimiser over the same parameters loads the saved state.
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():  # as a checkpoint stores them: contiguous
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim == 4:
                state[key] = value.contiguous()
    restored = make_optimizer(model, name=name, lr=1e-2, momentum=0.9, weight_decay=1e-2)
    restored.load_state_dict(saved)
    match_state_layouts(restored)
    for seed in range(3, 6):
        step_both(restored, model, reference, twin, seed)

    for (key, mine), theirs in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), key


@cuda.cudnn_benchmark(True)
def test_channels_last_bf16_steps_under_cudnn_benchmark_match_plain_fp32() -> None:
    """The job's GPU step format (channels_last, bf16 autocast, cuDNN's benchmarked kernels) computes
    what the plain fp32 step computes, to bf16's precision, and keeps its gradients channels_last."""
    torch.manual_seed(0)
    plain = build_model("resnet18", num_classes=10, in_channels=1, image_size=64).to(CUDA)
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    inputs = torch.randn(32, 1, 64, 64, device=CUDA)
    targets = torch.randint(0, 10, (32,), device=CUDA)
    plain.train()
    fast.train()
    plain_logits = plain(inputs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast_logits = fast(inputs.contiguous(memory_format=torch.channels_last))
    assert fast_logits.dtype == torch.bfloat16
    error = (fast_logits.float() - plain_logits).norm() / plain_logits.norm()
    assert error < 5e-2, f"relative error {error:.3g}"  # a wrong layout or format is off by ~1
    plain_loss = nn.functional.cross_entropy(plain_logits, targets)
    fast_loss = nn.functional.cross_entropy(fast_logits.float(), targets)
    plain_loss.backward()
    fast_loss.backward()
    assert torch.isfinite(fast_loss) and abs(fast_loss.item() - plain_loss.item()) < 0.05 * plain_loss.item()
    conv = fast.get_submodule("conv1").weight
    assert conv.grad is not None and conv.grad.is_contiguous(memory_format=torch.channels_last)
    reference = plain.get_submodule("conv1").weight.grad
    assert reference is not None
    assert (conv.grad - reference).norm() / reference.norm() < 0.2


def test_the_predictor_scores_on_the_gpu_as_on_the_cpu_in_both_layouts() -> None:
    data = checkpoint_bytes(seed=3, architecture="resnet18", image_size=64, channels=3)
    on_cpu = Predictor(data)
    on_gpu = Predictor(data, device="cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    images = [decode_image(noise_png(seed, size=(64, 64), mode="RGB")) for seed in range(12)]
    expected = on_cpu.probabilities(images)
    for channels_last in (False, True):
        on_gpu.set_channels_last(channels_last)
        scores = on_gpu.probabilities(images)
        assert scores.device.type == "cpu" and scores.shape == expected.shape
        # TF32 convolutions (PyTorch's default on CUDA) round more than the CPU's fp32.
        assert torch.allclose(scores, expected, atol=5e-3), (channels_last, (scores - expected).abs().max())
    assert on_gpu.predict(images[0]).keys() == on_cpu.predict(images[0]).keys()
