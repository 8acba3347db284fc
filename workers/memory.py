"""Keep the worker's resident memory near what a job needs.

glibc gives each thread that allocates under contention its own malloc arena (up to eight per core), and
a training job's threads (OpenMP's, the progress writer's, the database's) each grow one whose freed
space is seldom returned. On 60,000 28x28 images the peak RSS of a job above an idle worker measured
+309 MiB with glibc's default and +173 MiB with two arenas, at the same speed.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc_function(name: str) -> ctypes._CFuncPtr | None:
    try:
        return getattr(ctypes.CDLL(None), name)  # type: ignore[no-any-return]
    except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to tune
        return None


def limit_malloc_arenas(count: int) -> bool:
    """At most `count` malloc arenas from now on (0 keeps glibc's default); True when applied. Call it
    before the threads start: arenas already made stay."""
    mallopt = _libc_function("mallopt")
    if count <= 0 or mallopt is None:
        return False
    applied = bool(mallopt(M_ARENA_MAX, count))
    if not applied:
        log.warning("could not limit malloc arenas to %d", count)
    return applied


def release_free_memory() -> None:
    """Return the heap's free pages to the system (after a job: the next may be hours away)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
