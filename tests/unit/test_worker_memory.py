"""The worker's malloc tuning reaches glibc (these machines and the image run glibc)."""

from __future__ import annotations

import platform

import pytest

from workers.memory import limit_malloc_arenas, release_free_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_trim are glibc's")


@glibc
def test_arenas_are_limited_and_free_memory_is_released() -> None:
    assert limit_malloc_arenas(64) is True  # generous: this test process keeps its threads' speed
    release_free_memory()


def test_zero_keeps_the_default() -> None:
    assert limit_malloc_arenas(0) is False
