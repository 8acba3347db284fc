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
    min_image_size: int  # the smallest square input a forward pass accepts (train and eval, batch 2)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    description: str
    head: str  # attribute path of the final classification layer (replaced for another class count)
    first_conv: str  # attribute path of the first convolution (replaced for another channel count)
    weights: str | None = None  # torchvision weights enum entry behind `init="pretrained"`


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


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attribute, module)


def _torchvision(arch: str, first_conv: str) -> Builder:
    """Builder for torchvision's `arch` with `first_conv` swapped for the data's channel count."""

    def build(num_classes: int, in_channels: int, _image_size: int) -> nn.Module:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        conv = model.get_submodule(first_conv)
        assert isinstance(conv, nn.Conv2d), (arch, first_conv)
        _set_submodule(model, first_conv, _replace_first_conv(conv, in_channels))
        return model

    build.__name__ = f"build_{arch}"
    return build


def _tv(
    name: str,
    *,
    min_image_size: int,
    head: str,
    first_conv: str,
    weights: str,
    description: str,
) -> ModelInfo:
    return ModelInfo(
        name=name,
        build=_torchvision(name, first_conv),
        default_image_size=224,
        min_image_size=min_image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source="torchvision",
        description=description,
        head=head,
        first_conv=first_conv,
        weights=weights,
    )


# min_image_size was measured: every size from it up runs forward (eval) and backward (train mode,
# batch 2) for 1 and 3 channels. ResNets, MobileNetV3 and EfficientNet end in adaptive pooling after
# padded stride-2 convolutions, so even 1x1 inputs go through; AlexNet's and ConvNeXt's unpadded
# kernels and VGG's five max-pools need the sizes given.
MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="lenet",
            build=LeNet5,
            default_image_size=32,
            min_image_size=16,
            mean=HALF_MEAN,
            std=HALF_STD,
            source="trainserve",
            description="LeNet-5: two 5x5 convolutions and three fully connected layers.",
            head="classifier.5",
            first_conv="features.0",
        ),
        ModelInfo(
            name="simple_cnn",
            build=SimpleCNN,
            default_image_size=28,
            min_image_size=4,
            mean=HALF_MEAN,
            std=HALF_STD,
            source="trainserve",
            description="The classic MNIST CNN: 3x3 convolutions of 32 and 64 channels with max-pooling, "
            "FC 64.",
            head="classifier.5",
            first_conv="features.0",
        ),
        _tv(
            "alexnet",
            min_image_size=63,
            head="classifier.6",
            first_conv="features.0",
            weights="AlexNet_Weights.IMAGENET1K_V1",
            description="AlexNet (torchvision).",
        ),
        _tv(
            "vgg11_bn",
            min_image_size=32,
            head="classifier.6",
            first_conv="features.0",
            weights="VGG11_BN_Weights.IMAGENET1K_V1",
            description="VGG-11 with batch normalization (torchvision).",
        ),
        _tv(
            "resnet18",
            min_image_size=1,
            head="fc",
            first_conv="conv1",
            weights="ResNet18_Weights.IMAGENET1K_V1",
            description="ResNet-18 (torchvision).",
        ),
        _tv(
            "resnet34",
            min_image_size=1,
            head="fc",
            first_conv="conv1",
            weights="ResNet34_Weights.IMAGENET1K_V1",
            description="ResNet-34 (torchvision).",
        ),
        _tv(
            "resnet50",
            min_image_size=1,
            head="fc",
            first_conv="conv1",
            weights="ResNet50_Weights.IMAGENET1K_V2",
            description="ResNet-50 (torchvision).",
        ),
        _tv(
            "mobilenet_v3_small",
            min_image_size=1,
            head="classifier.3",
            first_conv="features.0.0",
            weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1",
            description="MobileNetV3-Small (torchvision).",
        ),
        _tv(
            "mobilenet_v3_large",
            min_image_size=1,
            head="classifier.3",
            first_conv="features.0.0",
            weights="MobileNet_V3_Large_Weights.IMAGENET1K_V2",
            description="MobileNetV3-Large (torchvision).",
        ),
        _tv(
            "efficientnet_b0",
            min_image_size=1,
            head="classifier.1",
            first_conv="features.0.0",
            weights="EfficientNet_B0_Weights.IMAGENET1K_V1",
            description="EfficientNet-B0 (torchvision).",
        ),
        _tv(
            "convnext_tiny",
            min_image_size=32,
            head="classifier.2",
            first_conv="features.0.0",
            weights="ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
            description="ConvNeXt-Tiny (torchvision).",
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


def head_module(model: nn.Module, name: str) -> nn.Module:
    """The classification layer of a model built by `build_model(name, ...)`."""
    return model.get_submodule(get_model_info(name).head)


def backbone_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter but the head's: what `freeze_epochs` freezes."""
    head = {id(p) for p in head_module(model, name).parameters()}
    return [p for p in model.parameters() if id(p) not in head]
