"""Build a network by name, adapted to the data's channels, image size and class count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from models.lenet import LeNet5
from models.simple_cnn import SimpleCNN

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Tutorials' small CNNs map [0, 1] pixels to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> module


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Builder
    default_image_size: int
    min_image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    description: str


def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` reading `in_channels` channels (grayscale data on RGB architectures)."""
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def _alexnet(num_classes: int, in_channels: int, _image_size: int) -> nn.Module:
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    model.features[0] = _replace_first_conv(model.features[0], in_channels)
    return model


def _resnet18(num_classes: int, in_channels: int, _image_size: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _replace_first_conv(model.conv1, in_channels)
    return model


def _mobilenet_v3_small(num_classes: int, in_channels: int, _image_size: int) -> nn.Module:
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    model.features[0][0] = _replace_first_conv(model.features[0][0], in_channels)
    return model


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "lenet",
            LeNet5,
            32,
            16,
            HALF_MEAN,
            HALF_STD,
            "trainserve",
            "LeNet-5: two 5x5 convolutions and three fully connected layers.",
        ),
        ModelInfo(
            "simple_cnn",
            SimpleCNN,
            28,
            4,
            HALF_MEAN,
            HALF_STD,
            "trainserve",
            "The classic MNIST CNN: 3x3 convolutions of 32 and 64 channels with max-pooling, FC 64.",
        ),
        ModelInfo(
            "alexnet",
            _alexnet,
            224,
            63,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "torchvision",
            "AlexNet (torchvision).",
        ),
        ModelInfo(
            "resnet18",
            _resnet18,
            224,
            32,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "torchvision",
            "ResNet-18 (torchvision).",
        ),
        ModelInfo(
            "mobilenet_v3_small",
            _mobilenet_v3_small,
            224,
            32,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "torchvision",
            "MobileNetV3-Small (torchvision).",
        ),
    )
}


class UnknownModel(KeyError):
    pass


def get_model_info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModel(name) from None


def build_model(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The named network with `num_classes` outputs for `in_channels` x `image_size`² inputs."""
    info = get_model_info(name)
    if image_size < info.min_image_size:
        raise ValueError(f"{name} needs images of at least {info.min_image_size} pixels, not {image_size}")
    return info.build(num_classes, in_channels, image_size)
