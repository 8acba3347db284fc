"""Torch threads per forward pass: a lone image gets every core, a batch shares them between processes."""

from __future__ import annotations

import os
import threading

import torch

from app.core.config import Settings
from app.services.predictions import threads_for, use_threads

CORES = len(os.sched_getaffinity(0))


def test_a_lone_image_gets_every_core_and_a_batch_its_share() -> None:
    two = Settings(api_processes=2)
    assert threads_for(two, 1) == CORES
    assert threads_for(two, 8) == max(1, CORES // 2)
    assert threads_for(Settings(api_processes=CORES * 4), 8) == 1
    assert threads_for(Settings(), 8) == CORES


def test_a_fixed_thread_count_is_left_alone() -> None:
    assert threads_for(Settings(predict_torch_threads=3), 1) is None
    assert threads_for(Settings(predict_torch_threads=3), 32) is None


def test_use_threads_sets_the_calling_threads_count() -> None:
    seen: list[int] = []

    def run() -> None:
        use_threads(1)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [1]
