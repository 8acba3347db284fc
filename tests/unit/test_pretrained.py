"""Pretrained starting weights: found in the local torch cache only, loaded without unpickling objects,
adapted to grayscale inputs and another class count."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from models.pretrained import (
    LoadReport,
    PretrainedWeightsMissing,
    check_pretrained_available,
    load_compatible,
    load_pretrained,
    pretrained_weights_path,
)
from models.registry import MODELS, build_model

WITH_WEIGHTS = sorted(name for name, info in MODELS.items() if info.weights is not None)
RAN: list[str] = []


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME; `torch.hub.set_dir` (which would override it) is undone for the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch"


@pytest.fixture(scope="module")
def imagenet_resnet18() -> nn.Module:
    """Stands in for the ImageNet file: torchvision's resnet18, 1000 classes, fixed seed."""
    torch.manual_seed(1234)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial batch-norm statistics, so loading them is visible
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture
def resnet18_file(torch_home: Path, imagenet_resnet18: nn.Module) -> Path:
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(imagenet_resnet18.state_dict(), path)
    return path


def test_path_is_torchvision_s_file_in_torch_home(torch_home: Path) -> None:
    assert pretrained_weights_path("resnet18") == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    for name in WITH_WEIGHTS:
        url = torchvision.models.get_weight(MODELS[name].weights).url  # type: ignore[arg-type]
        path = pretrained_weights_path(name)
        assert path.parent == torch_home / "hub" / "checkpoints"
        assert path.name == url.rsplit("/", 1)[-1]


def test_torch_home_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a"))
    first = pretrained_weights_path("mobilenet_v3_small")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "b"))
    assert first.is_relative_to(tmp_path / "a")
    assert pretrained_weights_path("mobilenet_v3_small").is_relative_to(tmp_path / "b")


def test_set_dir_overrides_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caveat: once something calls torch.hub.set_dir, TORCH_HOME no longer matters."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "hub-dir"))  # undone by monkeypatch with the attribute above
    assert pretrained_weights_path("resnet18").parent == tmp_path / "hub-dir" / "checkpoints"


@pytest.mark.parametrize("name", ["lenet", "simple_cnn"])
def test_models_without_weights_have_no_path(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        pretrained_weights_path(name)


def test_missing_file_says_where_to_put_it(torch_home: Path) -> None:
    expected = torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(PretrainedWeightsMissing) as caught:
        check_pretrained_available("resnet50")
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "resnet50" in message
    assert str(expected) in message
    assert "never downloads" in message
    assert "TORCH_HOME" in message
    with pytest.raises(PretrainedWeightsMissing, match="never downloads"):
        load_pretrained(build_model("resnet50", num_classes=2, in_channels=3, image_size=32), "resnet50")
    assert not expected.exists()


def test_available_file_is_returned(resnet18_file: Path) -> None:
    assert check_pretrained_available("resnet18") == resnet18_file


def test_grayscale_ten_class_resnet18_reuses_the_imagenet_backbone(
    resnet18_file: Path, imagenet_resnet18: nn.Module
) -> None:
    source = imagenet_resnet18.state_dict()
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=32)
    head_before = {k: v.clone() for k, v in model.fc.state_dict().items()}

    report = load_pretrained(model, "resnet18")

    assert report.adapted == ["conv1.weight"]
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    assert set(report.loaded) == set(source) - {"conv1.weight", "fc.weight", "fc.bias"}
    state = model.state_dict()
    for key in ("bn1.weight", "layer1.0.conv1.weight", "layer3.1.bn2.running_var", "layer4.1.conv2.weight"):
        assert torch.equal(state[key], source[key]), key
    assert torch.equal(state["layer2.0.bn1.num_batches_tracked"], source["layer2.0.bn1.num_batches_tracked"])
    assert torch.equal(state["conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True))
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert all(torch.equal(model.fc.state_dict()[k], v) for k, v in head_before.items())  # fresh head

    # Summed filters: a gray image gives the RGB network's features for the same image in 3 channels.
    model.fc, reference = nn.Identity(), imagenet_resnet18
    reference_fc, reference.fc = reference.fc, nn.Identity()
    try:
        gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            torch.testing.assert_close(model.eval()(gray), reference(gray.expand(-1, 3, -1, -1)))
    finally:
        reference.fc = reference_fc


def test_rgb_imagenet_shaped_model_loads_everything(
    resnet18_file: Path, imagenet_resnet18: nn.Module
) -> None:
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=32)
    report = load_pretrained(model, "resnet18")
    assert report.skipped == [] and report.adapted == []
    assert report.loaded == list(imagenet_resnet18.state_dict())
    for key, value in imagenet_resnet18.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert report.to_dict() == {"loaded": report.loaded, "skipped": [], "adapted": []}


def record(tag: str) -> str:
    RAN.append(tag)
    return tag


class Payload:
    """Unpickling it calls `record`: what a malicious file would do with `os.system`."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return record, ("unpickled",)


def test_pickled_objects_are_refused_not_executed(torch_home: Path) -> None:
    path = pretrained_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "x": Payload()}, path)
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    RAN.clear()
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_pretrained(model, "resnet18")
    assert RAN == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.load(path, weights_only=False)  # the check above is not vacuous: a full unpickle runs it
    assert RAN == ["unpickled"]


def test_file_that_is_not_a_state_dict_is_refused(torch_home: Path) -> None:
    path = pretrained_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(torch.zeros(3), path)
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained(model, "resnet18")


def test_load_compatible_reports_every_key_it_does_not_use() -> None:
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, in_channels=1, image_size=32)
    source = build_model("lenet", num_classes=4, in_channels=3, image_size=32).state_dict()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source = {**source, "extra.weight": torch.zeros(2)}
    del source["features.3.bias"]

    report = load_compatible(model, source)  # no first_conv: the RGB filters are not adapted
    assert report.adapted == []
    assert sorted(report.skipped) == sorted(
        ["features.0.weight", "features.3.bias", "classifier.5.weight", "classifier.5.bias", "extra.weight"]
    )
    assert set(report.loaded) == set(fresh) - {
        "features.0.weight",
        "features.3.bias",
        "classifier.5.weight",
        "classifier.5.bias",
    }
    state = model.state_dict()
    for key in set(report.skipped) - {"extra.weight"}:
        assert torch.equal(state[key], fresh[key]), key  # untouched tensors keep their init
    for key in report.loaded:
        assert torch.equal(state[key], source[key]), key

    report = load_compatible(model, source, first_conv="features.0")
    assert report.adapted == ["features.0.weight"]
    assert torch.equal(
        model.state_dict()["features.0.weight"], source["features.0.weight"].sum(1, keepdim=True)
    )


def test_first_conv_is_only_adapted_from_rgb_to_gray() -> None:
    rgb = build_model("simple_cnn", num_classes=3, in_channels=3, image_size=28)
    gray = build_model("simple_cnn", num_classes=3, in_channels=1, image_size=28).state_dict()
    report = load_compatible(rgb, gray, first_conv="features.0")
    assert report.adapted == []
    assert report.skipped == ["features.0.weight"]


def test_load_report_to_dict() -> None:
    assert LoadReport(["a"], ["b"], ["c"]).to_dict() == {"loaded": ["a"], "skipped": ["b"], "adapted": ["c"]}
