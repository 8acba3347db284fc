"""A checkpoint turned into a ready model that returns class probabilities."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from PIL import Image

from models.checkpoint import bytes_to_state_dict
from models.preprocessing import Preprocessing, eval_input, normalize, to_uint8
from models.registry import build_model


def model_from_checkpoint(
    data: bytes, *, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the architecture named in the metadata and load the weights strictly."""
    state_dict, meta = bytes_to_state_dict(data)
    preprocessing = Preprocessing.from_meta(meta["preprocessing"])
    model = build_model(
        meta["architecture"],
        num_classes=len(meta["classes"]),
        in_channels=preprocessing.channels,
        image_size=preprocessing.image_size,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), meta


class Predictor:
    """Thread-safe inference for one checkpoint (the API calls it from a thread pool)."""

    def __init__(self, data: bytes, *, device: torch.device | str = "cpu", serialize: bool = True) -> None:
        self.device = torch.device(device)
        self.model, self.meta = model_from_checkpoint(data, device=self.device)
        self.classes: list[str] = list(self.meta["classes"])
        self.preprocessing = Preprocessing.from_meta(self.meta["preprocessing"])
        # Eval-mode forward passes do not mutate the model; a server that runs passes in parallel on
        # purpose (one thread each) turns the lock off.
        self._lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if serialize else contextlib.nullcontext()
        )
        self.memory_format = torch.contiguous_format

    def set_channels_last(self, channels_last: bool) -> None:
        """Run in the channels_last layout (oneDNN's fast path for many CNNs) or the default one; the
        scores are the same up to float rounding."""
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        with self._lock:
            self.model.to(memory_format=self.memory_format)

    @property
    def size_bytes(self) -> int:
        """Memory held by the weights and buffers: what a cache bound counts."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """Softmax over every class, one row per image."""
        return self.probabilities_of([to_uint8(image, self.preprocessing) for image in images])

    def probabilities_of(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Softmax rows for uint8 images already made by `to_uint8` (a server decodes them itself,
        so one bad file fails alone instead of the whole batch)."""
        batch = torch.stack(tensors).to(self.device)
        inputs = normalize(batch, self.preprocessing).contiguous(memory_format=self.memory_format)
        with self._lock, torch.inference_mode():
            return torch.softmax(self.model(inputs).float(), dim=1).cpu()

    def predict(self, image: Image.Image) -> dict[str, float]:
        probs = self.probabilities([image])[0]
        return {name: float(p) for name, p in zip(self.classes, probs, strict=True)}


__all__ = ["Predictor", "eval_input", "model_from_checkpoint"]
