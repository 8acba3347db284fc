"""Safetensors checkpoints with JSON metadata, and the Predictor built from them."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from models.checkpoint import METADATA_KEY, bytes_to_state_dict, read_metadata, state_dict_to_bytes
from models.predictor import Predictor, model_from_checkpoint
from models.preprocessing import Preprocessing, decode_image, eval_input
from models.registry import build_model
from tests.factories import encode, noise_png

CLASSES = ["cat", "dog", "emu"]


def make_checkpoint(
    architecture: str = "simple_cnn", *, channels: int = 1, image_size: int = 12, seed: int = 0
) -> tuple[nn.Module, bytes, dict[str, Any]]:
    """A randomly initialised model (with non-trivial batch-norm statistics) and its checkpoint."""
    torch.manual_seed(seed)
    model = build_model(architecture, num_classes=len(CLASSES), in_channels=channels, image_size=image_size)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1.0, 1.0)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(17)
    model.eval()
    preprocessing = Preprocessing.for_channels(
        image_size=image_size, channels=channels, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    meta = {
        "architecture": architecture,
        "classes": CLASSES,
        "preprocessing": preprocessing.to_meta(),
        "job_id": 12,
        "monitor": "val_loss",
    }
    return model, state_dict_to_bytes(model.state_dict(), meta), meta


def assorted_images() -> list[Image.Image]:
    return [
        decode_image(noise_png(1, size=(12, 12), mode="L")),
        decode_image(noise_png(2, size=(40, 23), mode="RGB")),
        Image.new("RGBA", (9, 30), (10, 200, 30, 100)),
        Image.new("P", (5, 5), 3),
        Image.fromarray(np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)),  # I;16
    ]


# ---------------------------------------------------------------- bytes


def test_round_trip_keeps_tensors_and_metadata() -> None:
    state = {
        "weight": torch.randn(4, 3),
        "bias": torch.zeros(4),
        "counts": torch.arange(5, dtype=torch.int64),
        "half": torch.randn(2, 2).half(),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "transposed": torch.randn(3, 5).t(),  # not contiguous
    }
    meta = {"classes": ["a", "b"], "nested": {"x": [1, 2.5, None]}, "unicode": "éß∂"}
    restored, restored_meta = bytes_to_state_dict(state_dict_to_bytes(state, meta))
    assert restored_meta == meta
    assert set(restored) == set(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name


def test_round_trip_of_a_real_model_state_dict() -> None:
    model, data, meta = make_checkpoint("lenet", channels=3, image_size=16)
    state, restored_meta = bytes_to_state_dict(data)
    assert restored_meta == meta
    expected = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_checkpoint_is_a_real_safetensors_file(tmp_path: Path) -> None:
    state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3)}
    meta = {"architecture": "x", "classes": ["a"]}
    path = tmp_path / "weights.safetensors"
    path.write_bytes(state_dict_to_bytes(state, meta))
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(state)
        for name, tensor in state.items():
            assert torch.equal(handle.get_tensor(name), tensor)
        assert json.loads(handle.metadata()[METADATA_KEY]) == meta


def test_metadata_is_readable_without_the_tensors() -> None:
    _, data, meta = make_checkpoint()
    (header_length,) = struct.unpack("<Q", data[:8])
    assert read_metadata(data[: 8 + header_length]) == meta


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x02\x03",
        b"1234567",
        struct.pack("<Q", 10**12) + b"{}",  # header longer than the file
        struct.pack("<Q", 7) + b"garbage",  # header is not JSON
        struct.pack("<Q", 4) + b"\xff\xfe{}",  # header is not UTF-8
        b"PK\x03\x04" + b"\x00" * 60,  # a zip, e.g. a pickled torch.save file
    ],
)
def test_read_metadata_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_metadata(data)


def test_read_metadata_rejects_safetensors_without_trainserve_metadata() -> None:
    plain = save_safetensors({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="metadata"):
        read_metadata(plain)
    other = save_safetensors({"w": torch.zeros(2)}, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="metadata"):
        read_metadata(other)


@pytest.mark.parametrize(
    "header", [b"[]", b'"text"', b"null", b'{"__metadata__": null}', b'{"__metadata__": []}']
)
def test_read_metadata_rejects_a_header_that_is_not_an_object(header: bytes) -> None:
    with pytest.raises(ValueError):
        read_metadata(struct.pack("<Q", len(header)) + header)


def test_read_metadata_rejects_trainserve_metadata_that_is_not_json() -> None:
    data = save_safetensors({"w": torch.zeros(1)}, metadata={METADATA_KEY: "{not json"})
    with pytest.raises(ValueError):
        read_metadata(data)


@pytest.mark.parametrize("raw", ["1", "null", "true"])
def test_read_metadata_rejects_trainserve_metadata_that_is_not_an_object(raw: str) -> None:
    data = save_safetensors({"w": torch.zeros(1)}, metadata={METADATA_KEY: raw})
    with pytest.raises(ValueError):
        read_metadata(data)


# ---------------------------------------------------------------- Predictor


def test_model_from_checkpoint_rebuilds_the_architecture_in_eval_mode() -> None:
    model, data, meta = make_checkpoint()
    rebuilt, rebuilt_meta = model_from_checkpoint(data)
    assert rebuilt_meta == meta
    assert type(rebuilt) is type(model)
    assert not rebuilt.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


def test_model_from_checkpoint_is_strict() -> None:
    model, _, meta = make_checkpoint()
    state = model.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="Missing key"):
        model_from_checkpoint(state_dict_to_bytes(state, meta))


@pytest.mark.parametrize(("architecture", "channels", "size"), [("simple_cnn", 1, 12), ("lenet", 3, 20)])
def test_probabilities_sum_to_one_over_all_classes(architecture: str, channels: int, size: int) -> None:
    _, data, _ = make_checkpoint(architecture, channels=channels, image_size=size)
    predictor = Predictor(data)
    assert predictor.classes == CLASSES
    images = assorted_images()
    probs = predictor.probabilities(images)
    assert tuple(probs.shape) == (len(images), len(CLASSES))
    assert probs.dtype == torch.float32
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(images)))
    prediction = predictor.predict(images[1])
    assert list(prediction) == CLASSES
    assert sum(prediction.values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("architecture", "channels", "size"), [("simple_cnn", 1, 12), ("lenet", 3, 20)])
def test_predictor_matches_softmax_of_the_model_on_eval_input(
    architecture: str, channels: int, size: int
) -> None:
    model, data, meta = make_checkpoint(architecture, channels=channels, image_size=size)
    preprocessing = Preprocessing.from_meta(meta["preprocessing"])
    predictor = Predictor(data)
    images = assorted_images()
    by_hand = []
    with torch.inference_mode():
        for image in images:
            expected = torch.softmax(model(eval_input(image, preprocessing)), dim=1)[0]
            by_hand.append(expected)
            assert torch.equal(predictor.probabilities([image])[0], expected)
            assert predictor.predict(image) == {
                name: float(p) for name, p in zip(CLASSES, expected, strict=True)
            }
    torch.testing.assert_close(predictor.probabilities(images), torch.stack(by_hand), rtol=0, atol=1e-6)


def test_predictor_uses_the_batch_norm_running_statistics() -> None:
    """Eval mode: an image's probabilities do not depend on the other images in the batch."""
    _, data, _ = make_checkpoint()
    predictor = Predictor(data)
    images = assorted_images()
    alone = predictor.probabilities(images[:1])[0]
    together = predictor.probabilities(images)[0]
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-6)


def test_predictor_predictions_differ_between_images() -> None:
    _, data, _ = make_checkpoint()
    probs = Predictor(data).probabilities(assorted_images())
    assert len({tuple(round(float(p), 5) for p in row) for row in probs}) > 1


def test_predictor_from_jpeg_bytes() -> None:
    _, data, _ = make_checkpoint()
    image = decode_image(encode(Image.new("RGB", (30, 30), (90, 10, 10)), "JPEG"))
    assert sum(Predictor(data).predict(image).values()) == pytest.approx(1.0, abs=1e-6)


def test_predictor_is_thread_safe() -> None:
    _, data, _ = make_checkpoint()
    predictor = Predictor(data)
    images = assorted_images()
    expected = predictor.probabilities(images)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(predictor.probabilities(images))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 20
    for result in results:
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
