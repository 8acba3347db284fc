"""models/weights_file.py: what a client's weight file may be, and what it may never do."""

from __future__ import annotations

import io
import resource
import struct

import pytest
import torch

from models.weights_file import WeightsFileError, parse_weights


def legacy_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize("claimed", [2**36, 2**40, 2**62])
def test_a_storage_claiming_terabytes_is_refused_without_allocating_it(claimed: int) -> None:
    data = bytearray(legacy_bytes({"w": torch.zeros(10)}))
    position = len(data) - 40 - 8  # the storage's element count precedes its 40 bytes of data
    assert struct.unpack("<q", data[position : position + 8])[0] == 10
    struct.pack_into("<q", data, position, claimed)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(WeightsFileError, match="weights_only=True"):
        parse_weights(bytes(data))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024


def test_shared_storage_and_views_convert_to_safetensors() -> None:
    from safetensors.torch import load

    from models.weights_file import to_safetensors

    base = torch.arange(12.0)
    parsed = parse_weights(legacy_bytes({"a": base, "b": base[2:6], "c": base.view(3, 4)}))
    assert parsed.num_parameters == 12 + 4 + 12
    stored = load(to_safetensors(parsed, {}))  # safetensors refuses shared storage: each is copied
    assert torch.equal(stored["b"], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(stored["c"], base.view(3, 4))


def test_non_tensor_values_in_a_state_dict_are_ignored() -> None:
    parsed = parse_weights(legacy_bytes({"w": torch.ones(2), "step": 5, "name": "x"}))
    assert list(parsed.state_dict) == ["w"]
