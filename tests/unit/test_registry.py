"""Registered architectures build for grayscale and RGB data at their default and minimum size.

Every model's forward pass at its minimum size (and its head/first-conv metadata) is covered by
test_registry_models.py; here the default sizes run too, for the models cheap enough on a CPU.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

from models.registry import MODELS, UnknownModel, build_model, get_model_info

NUM_CLASSES = 7
SMALL = ["lenet", "simple_cnn"]  # their layers depend on the image size
# torchvision networks whose 224x224 forward pass is cheap on a CPU; the others (VGG, ResNet-50,
# ConvNeXt...) build and run the same way and are only exercised at their minimum size.
AT_DEFAULT_SIZE = ["alexnet", "mobilenet_v3_small", "resnet18"]


@cache
def built(name: str, channels: int, size: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=NUM_CLASSES, in_channels=channels, image_size=size)


def forward(model: nn.Module, channels: int, size: int) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0)))


def sizes(name: str) -> list[int]:
    info = MODELS[name]
    return [info.min_image_size, info.default_image_size]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", SMALL)
def test_small_models_build_and_run_at_default_and_min_size(name: str, channels: int) -> None:
    for size in sizes(name):
        output = forward(built(name, channels, size), channels, size)
        assert tuple(output.shape) == (2, NUM_CLASSES), size
        assert bool(torch.isfinite(output).all())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", AT_DEFAULT_SIZE)
def test_torchvision_models_build_and_run_at_default_and_min_size(name: str, channels: int) -> None:
    info = MODELS[name]
    assert info.default_image_size == 224
    model = built(name, channels, info.default_image_size)
    for size in sizes(name):  # torchvision networks end in adaptive pooling: one model for every size
        output = forward(model, channels, size)
        assert tuple(output.shape) == (2, NUM_CLASSES), size
        assert bool(torch.isfinite(output).all())


@pytest.mark.parametrize("name", SMALL + AT_DEFAULT_SIZE)
def test_first_convolution_reads_the_data_channels(name: str) -> None:
    size = MODELS[name].min_image_size
    for channels in (1, 3):
        model = built(name, channels, size)
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.in_channels == channels
        with pytest.raises(RuntimeError):
            forward(model, 4 - channels, size)  # 1 ↔ 3


@pytest.mark.parametrize("name", SMALL + AT_DEFAULT_SIZE)
def test_model_trains_one_step_at_min_size(name: str) -> None:
    """Train mode (batch norm on batch statistics, dropout) must also work on the smallest images."""
    size = MODELS[name].min_image_size
    model = built(name, 1, size)
    model.train()
    try:
        loss = nn.functional.cross_entropy(model(torch.randn(2, 1, size, size)), torch.tensor([0, 6]))
        loss.backward()
        assert bool(torch.isfinite(loss))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_image_below_min_size_is_refused(name: str) -> None:
    info = MODELS[name]
    if info.min_image_size <= 1:
        with pytest.raises(ValueError):
            build_model(name, num_classes=2, in_channels=3, image_size=0)
        return
    with pytest.raises(ValueError, match=str(info.min_image_size)):
        build_model(name, num_classes=2, in_channels=3, image_size=info.min_image_size - 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_info_is_consistent(name: str) -> None:
    info = get_model_info(name)
    assert info is MODELS[name]
    assert info.name == name
    assert 1 <= info.min_image_size <= info.default_image_size
    assert len(info.mean) == len(info.std) == 3
    assert all(0 <= m <= 1 for m in info.mean)
    assert all(s > 0 for s in info.std)
    assert info.description


def test_unknown_name_raises_unknown_model() -> None:
    with pytest.raises(UnknownModel):
        get_model_info("vgg-9000")
    with pytest.raises(UnknownModel) as caught:
        build_model("vgg-9000", num_classes=2, in_channels=3, image_size=224)
    assert isinstance(caught.value, KeyError)
    assert "vgg-9000" in str(caught.value)
