"""Weights as safetensors bytes with JSON metadata: no pickle, so loading one can never run code."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

METADATA_KEY = "trainserve"


def state_dict_to_bytes(state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def read_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata from a safetensors header, read without touching the tensors."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: too short")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise ValueError("not a safetensors file: header length past the end")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file: the header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise ValueError("safetensors file carries no trainserve metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("trainserve metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError("trainserve metadata is not a JSON object")
    return meta


def bytes_to_state_dict(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_safetensors(data), read_metadata(data)
