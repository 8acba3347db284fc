"""The registry's metadata is true of the networks it builds: head and first-conv paths, the smallest
input size, the pretrained weights entry, and the head/backbone split used to freeze the backbone."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torchvision
from torch import nn

from models.registry import MODELS, backbone_parameters, build_model, head_module

NUM_CLASSES = 5
TORCHVISION = sorted(name for name, info in MODELS.items() if info.source == "torchvision")
EXPECTED = [
    "alexnet",
    "convnext_tiny",
    "efficientnet_b0",
    "lenet",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet18",
    "resnet34",
    "resnet50",
    "simple_cnn",
    "vgg11_bn",
]


@cache
def built(name: str, channels: int) -> nn.Module:
    """One model per (name, channels) for the whole module: building VGG or ConvNeXt takes seconds."""
    torch.manual_seed(0)
    model = build_model(
        name, num_classes=NUM_CLASSES, in_channels=channels, image_size=MODELS[name].min_image_size
    )
    return model.eval()


def inputs(channels: int, size: int) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def test_the_registry_lists_the_expected_models() -> None:
    assert sorted(MODELS) == EXPECTED


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", EXPECTED)
def test_forward_at_min_size_and_paths_are_the_layers_that_run(name: str, channels: int) -> None:
    info = MODELS[name]
    model = built(name, channels)
    head = head_module(model, name)
    first_conv = model.get_submodule(info.first_conv)
    assert isinstance(head, nn.Linear)
    assert head.out_features == NUM_CLASSES
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.in_channels == channels

    convs_called: list[nn.Module] = []
    head_outputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda m, _i, _o: convs_called.append(m))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    hooks.append(head.register_forward_hook(lambda _m, _i, output: head_outputs.append(output)))
    try:
        with torch.inference_mode():
            output = model(inputs(channels, info.min_image_size))
    finally:
        for hook in hooks:
            hook.remove()
    assert output.shape == (2, NUM_CLASSES)
    assert bool(torch.isfinite(output).all())
    assert convs_called[0] is first_conv  # the first convolution to see the image
    assert len(head_outputs) == 1 and torch.equal(head_outputs[0], output)  # nothing after the head


@pytest.mark.parametrize("name", EXPECTED)
def test_min_image_size_is_the_smallest_that_runs(name: str) -> None:
    info = MODELS[name]
    if info.min_image_size == 1:
        return  # nothing smaller to try
    size = info.min_image_size - 1
    with pytest.raises(ValueError, match=str(info.min_image_size)):
        build_model(name, num_classes=NUM_CLASSES, in_channels=3, image_size=size)
    with pytest.raises(RuntimeError), torch.inference_mode():  # the network itself refuses it too
        built(name, 3)(inputs(3, size))


@pytest.mark.parametrize("name", EXPECTED)
def test_backbone_parameters_are_all_but_the_head(name: str) -> None:
    model = built(name, 1)
    head = list(head_module(model, name).parameters())
    backbone = backbone_parameters(model, name)
    assert len(head) == 2  # weight and bias
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in head)
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in backbone} | {id(p) for p in head} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", EXPECTED)
def test_weights_entry_names_the_architecture_s_imagenet_weights(name: str) -> None:
    info = MODELS[name]
    if info.source != "torchvision":
        assert info.weights is None
        return
    assert info.weights is not None
    weights = torchvision.models.get_weight(info.weights)
    assert weights in list(torchvision.models.get_model_weights(name))
    assert len(weights.meta["categories"]) == 1000
    assert info.default_image_size == 224


def test_small_models_keep_their_sizes() -> None:
    assert (MODELS["lenet"].default_image_size, MODELS["simple_cnn"].default_image_size) == (32, 28)
    assert all(MODELS[name].default_image_size == 224 for name in TORCHVISION)
