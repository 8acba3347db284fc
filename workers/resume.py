"""Resumable training state without pickle: tensors go to safetensors, everything else to JSON.

After every epoch the worker stores a `last` checkpoint holding the model, the optimiser, the LR
schedule, the grad scaler, the EMA, the early-stopping state, the RNG states and the epoch. A job that
is picked up again (worker killed, machine lost, SIGTERM) continues from the epoch after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.checkpoint import bytes_to_state_dict, state_dict_to_bytes
from workers.engine import EarlyStopping, LRSchedule

FORMAT = "trainserve-resume-1"


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of `obj` with each tensor replaced by a reference into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        # Pairs, not a JSON object: optimiser and scheduler states have integer keys.
        return {"__dict__": [[k, split_tensors(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a resumable checkpoint")


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored per-parameter state tensor (momentum, Adam's moments) its parameter's memory
    layout. A checkpoint stores them contiguous; the fused Adam kernels walk a parameter and its state
    as one flat array, so a channels_last parameter with contiguous moments silently steps wrong."""
    for parameter, values in optimizer.state.items():
        for name, value in values.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape == parameter.shape
                and value.stride() != parameter.stride()
            ):
                values[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


@dataclass
class TrainingState:
    """Everything that evolves during training, by reference; `save`/`restore` move it as a whole."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    tracker: EarlyStopping
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None

    def save(self, *, epoch: int, meta: dict[str, Any]) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "tracker": {"best": self.tracker.best, "bad_epochs": self.tracker.bad_epochs},
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        skeleton = split_tensors(state, tensors, "s")
        return state_dict_to_bytes(tensors, {**meta, "format": FORMAT, "state": skeleton})

    def restore(self, data: bytes) -> int:
        """Load a `save`d state; returns the epoch it was saved after."""
        tensors, meta = bytes_to_state_dict(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a resumable checkpoint (format {meta.get('format')!r})")
        state = join_tensors(meta["state"], tensors)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        match_state_layouts(self.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.tracker.best = state["tracker"]["best"]
        self.tracker.bad_epochs = state["tracker"]["bad_epochs"]
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return int(state["epoch"])
