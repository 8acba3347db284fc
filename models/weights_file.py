"""A client's weight file → a plain state dict of tensors, without ever running code from it.

safetensors files are parsed by the safetensors library (a JSON header and raw bytes: nothing to
execute). PyTorch files (`.pt`, `.pth`, zip or legacy pickle) go through `torch.load(weights_only=True)`,
whose restricted unpickler refuses every global that is not a tensor or a plain container, so a pickle
carrying `os.system` or any other callable is refused before anything is constructed. What comes out is
converted to safetensors, the only form in which weights are stored.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from models.checkpoint import METADATA_KEY

# Where training scripts commonly nest the model's weights inside a checkpoint dict.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")


class WeightsFileError(ValueError):
    """The bytes are not weights we accept; the message says why, for the client."""


@dataclass
class ParsedWeights:
    state_dict: dict[str, torch.Tensor]
    source_format: str  # "safetensors" or "pytorch"
    meta: dict[str, Any]  # trainserve metadata when the file carries it (a /jobs/{id}/checkpoint)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_length,) = struct.unpack("<Q", data[:8])
    return 0 < header_length <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_meta(data: bytes) -> dict[str, Any]:
    (header_length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_length])
        raw = header.get("__metadata__", {}).get(METADATA_KEY)
        meta = json.loads(raw) if isinstance(raw, str) else {}
    except (ValueError, AttributeError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _tensors_of(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside whatever `torch.load` returned (a state dict, or a checkpoint holding one)."""
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"the file holds a {type(obj).__name__}, not a state dict of tensors")
    for key in NESTED_STATE_KEYS:
        nested = obj.get(key)
        if isinstance(nested, Mapping) and any(isinstance(v, torch.Tensor) for v in nested.values()):
            obj = nested
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel/DDP
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _refusal_reason(exc: Exception) -> str:
    """What torch refused and why, without its advice on how to load the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))
    for pattern in (
        r"Unsupported global: GLOBAL \S+ was not an allowed global by default",
        r"Trying to load unsupported GLOBAL \S+ whose module \S+ is blocked",
        r"Unsupported operand \d+",
        r"failed finding central directory",
    ):
        found = re.search(pattern, text)
        if found:
            return found.group(0)
    return (text.split(". ")[0] or type(exc).__name__)[:200]


def parse_weights(data: bytes) -> ParsedWeights:
    """Read a safetensors or PyTorch weight file; raise WeightsFileError saying why it is refused."""
    if not data:
        raise WeightsFileError("empty file")
    if _looks_like_safetensors(data):
        try:
            state_dict = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise WeightsFileError(f"not a valid safetensors file: {exc}") from None
        source_format, meta = "safetensors", _safetensors_meta(data)
    else:
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler raises many types; every one means "refused"
            reason = _refusal_reason(exc)
            raise WeightsFileError(
                "not a safetensors file, and torch.load(weights_only=True) refused it as a PyTorch "
                f"state dict: {reason}"
            ) from None
        state_dict, source_format, meta = _tensors_of(loaded), "pytorch", {}
    if not state_dict:
        raise WeightsFileError("the file holds no tensors")
    return ParsedWeights(state_dict=state_dict, source_format=source_format, meta=meta)


def to_safetensors(parsed: ParsedWeights, meta: dict[str, Any]) -> bytes:
    """The tensors as safetensors bytes (each tensor its own contiguous copy: shared storage is fine)."""
    try:
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in parsed.state_dict.items()}
        return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    except (RuntimeError, ValueError, TypeError, SafetensorError) as exc:  # sparse, quantized, exotic dtypes
        raise WeightsFileError(f"tensors cannot be stored as safetensors: {exc}") from None
