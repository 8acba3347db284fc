"""Starting weights: torchvision's ImageNet files from the local torch cache, or an earlier checkpoint.

Nothing is downloaded at run time: a missing file is an error that says where to put it. Files are
read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from models.registry import get_model_info


class PretrainedWeightsMissing(FileNotFoundError):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(
            f"pretrained weights for {name} not found at {path}; trainserve never downloads at run time: "
            "copy the file there (or point TORCH_HOME at a folder holding hub/checkpoints/"
            f"{path.name})"
        )
        self.path = path


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrained_weights_path(name: str) -> Path:
    """Where torchvision would have saved the model's ImageNet weights (honours TORCH_HOME)."""
    info = get_model_info(name)
    if info.weights is None:
        raise ValueError(f"{name} has no pretrained weights")
    weights = torchvision.models.get_weight(info.weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def check_pretrained_available(name: str) -> Path:
    path = pretrained_weights_path(name)
    if not path.is_file():
        raise PretrainedWeightsMissing(name, path)
    return path


def load_compatible(
    model: nn.Module, state_dict: Mapping[str, Any], *, first_conv: str | None = None
) -> LoadReport:
    """Copy every source tensor whose name and shape match the model's; everything else keeps the
    model's own init and is listed in `skipped` (a head for another class count, keys one side lacks).

    With `first_conv` (the registry's path) and RGB source filters for a grayscale model, the filters
    are summed over the input channels, so a gray image x gives what the RGB net gives for (x, x, x)."""
    report = LoadReport()
    merged = dict(model.state_dict())
    first_conv_weight = f"{first_conv}.weight" if first_conv else None
    for key, target in merged.items():
        source = state_dict.get(key)
        if not isinstance(source, torch.Tensor):
            report.skipped.append(key)
        elif source.shape == target.shape:
            merged[key] = source.to(target.dtype)
            report.loaded.append(key)
        elif (
            key == first_conv_weight
            and source.ndim == target.ndim == 4
            and target.shape[1] == 1
            and source.shape[1] == 3
            and source.shape[0] == target.shape[0]
            and source.shape[2:] == target.shape[2:]
        ):
            merged[key] = source.sum(dim=1, keepdim=True).to(target.dtype)
            report.adapted.append(key)
        else:
            report.skipped.append(key)
    report.skipped.extend(key for key in state_dict if key not in merged)
    model.load_state_dict(merged, strict=True)
    return report


def load_pretrained(model: nn.Module, name: str) -> LoadReport:
    """Load the model's ImageNet weights from the torch cache into `model` (adapted to its shape)."""
    path = check_pretrained_available(name)
    # weights_only: tensors and plain containers only; a pickled object is refused, never constructed.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return load_compatible(model, state_dict, first_conv=get_model_info(name).first_conv)
