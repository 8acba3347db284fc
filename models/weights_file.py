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
import pickletools
import re
import struct
import zipfile
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


# safetensors dtype names → torch dtypes: what trainserve loads. The format knows more (F4, F6_E2M3,
# F6_E3M2, F8_E8M0...) than safetensors.torch maps to torch; those are refused by name, not a KeyError.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
# Pickle opcodes that hand the unpickler a persistent id: torch.save emits one per tensor (its storage).
_PERSISTENT_ID_OPS = frozenset({"PERSID", "BINPERSID"})
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, its storage keys


class WeightsFileError(ValueError):
    """The bytes are not weights we accept; the message says why, for the client."""


class WeightsTooLarge(WeightsFileError):
    """The file is over one of the `WeightsLimits` (the API answers 413, naming the limit)."""


@dataclass(frozen=True)
class WeightsLimits:
    """Bounds checked before anything is materialised. `expanded_bytes`: the tensors as they will be
    stored (a stride-0 view of 16M elements in a 1.5 KB file expands to 64 MB); `expansion`: the same
    as a multiple of the file's size; `tensors`: how many; `metadata_bytes`: the safetensors header or
    the PyTorch pickle (which alone decides how many Python objects unpickling creates)."""

    expanded_bytes: int
    expansion: float
    tensors: int
    metadata_bytes: int


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


def _too_large(what: str, value: int, limit: int, setting: str) -> WeightsTooLarge:
    return WeightsTooLarge(f"{what} is {value}; the limit is {limit} (TRAINSERVE_{setting})")


def _check_safetensors_header(data: bytes, limits: WeightsLimits | None) -> None:
    """Header size, tensor count and every dtype, from the JSON header alone (no tensor is built)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    if limits is not None and header_length > limits.metadata_bytes:
        raise _too_large(
            "the safetensors header", header_length, limits.metadata_bytes, "MAX_WEIGHTS_METADATA_BYTES"
        )
    try:
        header = json.loads(data[8 : 8 + header_length])
    except ValueError as exc:
        raise WeightsFileError(f"not a valid safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsFileError("not a valid safetensors file: its header is not a JSON object")
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if limits is not None and len(entries) > limits.tensors:
        raise _too_large("the number of tensors", len(entries), limits.tensors, "MAX_WEIGHTS_TENSORS")
    for name, entry in entries.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in SAFETENSORS_DTYPES:
            raise WeightsFileError(
                f"tensor {name[:100]!r} has dtype {dtype[:40]!r}, which trainserve does not load "
                f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
            )


def _pickle_census(stream: io.BytesIO, budget: int) -> int:
    """Persistent ids (tensors) in the one pickle at the stream's position, read op by op without
    unpickling anything; refused once the pickle runs past `budget` bytes."""
    start, tensors = stream.tell(), 0
    try:
        for opcode, _arg, position in pickletools.genops(stream):
            if position is not None and position - start > budget:
                raise _too_large(
                    "the PyTorch pickle (metadata)", position - start, budget, "MAX_WEIGHTS_METADATA_BYTES"
                )
            tensors += opcode.name in _PERSISTENT_ID_OPS
    except WeightsTooLarge:
        raise
    except Exception as exc:  # genops raises ValueError and friends on anything that is not a pickle
        raise WeightsFileError(
            f"not a safetensors file, and refused as a PyTorch state dict: its pickle is unreadable ({exc})"
        ) from None
    return tensors


def _check_pytorch_layout(data: bytes, limits: WeightsLimits) -> None:
    """Bound what `torch.load` would build, from the file's layout, before it runs. A zip (torch.save
    since 1.6) declares each storage's size in its directory, and torch inflates exactly that much (a
    deflated entry is a zip bomb otherwise); its pickle is `data.pkl`. A legacy file is its pickles
    followed by the raw storages, so its storages are never larger than the file."""
    tensors, metadata = 0, 0
    if data.startswith(_ZIP_MAGIC):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
            return  # torch.load refuses it with its own reason
        if len(infos) > limits.tensors + 16:  # one entry per storage, plus a few records
            raise _too_large("the number of entries", len(infos), limits.tensors, "MAX_WEIGHTS_TENSORS")
        pickles = [info for info in infos if info.filename.endswith(".pkl")]
        metadata = sum(info.file_size for info in pickles)
        if metadata > limits.metadata_bytes:
            raise _too_large(
                "the PyTorch pickle (metadata)", metadata, limits.metadata_bytes, "MAX_WEIGHTS_METADATA_BYTES"
            )
        stored = sum(info.file_size for info in infos) - metadata
        if stored > limits.expanded_bytes:
            raise _too_large(
                "the tensors' stored bytes", stored, limits.expanded_bytes, "MAX_WEIGHTS_EXPANDED_BYTES"
            )
        for info in pickles:
            with archive.open(info) as member:
                tensors += _pickle_census(
                    io.BytesIO(member.read(limits.metadata_bytes + 1)), limits.metadata_bytes
                )
    else:
        stream = io.BytesIO(data)
        for _ in range(_LEGACY_PICKLES):
            if stream.tell() >= len(data):
                break
            tensors += _pickle_census(stream, limits.metadata_bytes - metadata)
            metadata = stream.tell()
    if tensors > limits.tensors:
        raise _too_large("the number of tensors", tensors, limits.tensors, "MAX_WEIGHTS_TENSORS")


def _check_expanded(state_dict: dict[str, torch.Tensor], file_bytes: int, limits: WeightsLimits) -> None:
    """The tensors' size once each is its own contiguous copy (how they are stored), computed from
    their shapes: nothing is copied yet."""
    if len(state_dict) > limits.tensors:
        raise _too_large("the number of tensors", len(state_dict), limits.tensors, "MAX_WEIGHTS_TENSORS")
    expanded = sum(t.numel() * t.element_size() for t in state_dict.values())
    if expanded > limits.expanded_bytes:
        raise _too_large(
            "the tensors' expanded size in bytes",
            expanded,
            limits.expanded_bytes,
            "MAX_WEIGHTS_EXPANDED_BYTES",
        )
    if expanded > limits.expansion * max(file_bytes, 1):
        raise WeightsTooLarge(
            f"the tensors expand to {expanded} bytes, {expanded / max(file_bytes, 1):.0f} times the file's "
            f"{file_bytes}; the limit is {limits.expansion:g} times (TRAINSERVE_MAX_WEIGHTS_EXPANSION)"
        )


def parse_weights(data: bytes, limits: WeightsLimits | None = None) -> ParsedWeights:
    """Read a safetensors or PyTorch weight file; raise WeightsFileError saying why it is refused
    (WeightsTooLarge past `limits`, checked before anything is materialised; None: trusted bytes)."""
    if not data:
        raise WeightsFileError("empty file")
    if _looks_like_safetensors(data):
        _check_safetensors_header(data, limits)
        try:
            state_dict = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError, KeyError) as exc:
            raise WeightsFileError(f"not a valid safetensors file: {exc}") from None
        source_format, meta = "safetensors", _safetensors_meta(data)
    else:
        if limits is not None:
            _check_pytorch_layout(data, limits)
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
    if limits is not None:
        _check_expanded(state_dict, len(data), limits)
    return ParsedWeights(state_dict=state_dict, source_format=source_format, meta=meta)


def to_safetensors(parsed: ParsedWeights, meta: dict[str, Any]) -> bytes:
    """The tensors as safetensors bytes (each tensor its own contiguous copy: shared storage is fine)."""
    try:
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in parsed.state_dict.items()}
        return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    except (RuntimeError, ValueError, TypeError, SafetensorError) as exc:  # sparse, quantized, exotic dtypes
        raise WeightsFileError(f"tensors cannot be stored as safetensors: {exc}") from None
