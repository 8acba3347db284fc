"""Training-time augmentation on batches of tensors (never per-image PIL work in the loop)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from workers.engine import random_affine

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_augment(preset: str, *, horizontal_flip: bool) -> Augment | None:
    """`basic`: per-image random resized crop (zoom, shift, small rotation) and optional flips, done for
    the whole batch at once; `strong`: TrivialAugmentWide per image first, random erasing last."""
    if preset == "none":
        if not horizontal_flip:
            return None

        def flip_only(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            flip = (torch.rand(batch.shape[0], generator=generator) < 0.5).to(batch.device)
            return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)

        return flip_only

    def basic(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_affine(batch, generator=generator, horizontal_flip=horizontal_flip)

    if preset == "basic":
        return basic
    if preset != "strong":
        raise ValueError(f"unknown augmentation preset {preset!r}")

    trivial = v2.TrivialAugmentWide()
    erase = v2.RandomErasing(p=0.25, value=0)

    def strong(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # TrivialAugment picks one op per image, so it runs image by image (on uint8, as it expects).
        as_uint8 = batch.mul(255.0).round_().to(torch.uint8)
        augmented = torch.stack([trivial(image) for image in as_uint8]).float().div_(255.0)
        augmented = basic(augmented, generator)
        return torch.stack([erase(image) for image in augmented])

    return strong


def build_mix(*, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Mix | None:
    """MixUp and/or CutMix (one of them per batch when both are on); targets become probabilities."""
    choices: list[v2.Transform] = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def mix(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, soft = transform(inputs, targets)
        return mixed, soft

    return mix
