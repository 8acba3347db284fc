"""The decoded-image cache: one memory-mapped uint8 file per (dataset contents, image size, channels).

Built once, on first use, by every core (a pool of spawned processes that never import torch, so they
start in a fraction of a second), reused by every later job on the same images, and rebuilt when the
images change, because the key is a hash over every image's SHA-256 and label, in order. Layout:

    <cache_dir>/decoded/<key>/pixels.u8    N x C x H x W uint8, C-contiguous, no header
    <cache_dir>/decoded/<key>/meta.json    format, key, shape, build time (read on every use)
    <cache_dir>/decoded/<key>/images.json  [[sha256, label], ...] in row order (for people and checks)
    <cache_dir>/locks/<key>.lock           flock: one builder per key, across processes

An entry is built in a private directory and renamed into place, so a reader sees a whole entry or
none; the lock makes a second worker wait for the first one's build instead of decoding twice.
This module imports neither torch nor the database: the child processes import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.imaging import decode_image, to_pixels

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK = 1024  # images per database read and per task sent to a decoding process

Fetch = Callable[[Sequence[int]], Iterable[tuple[int, bytes]]]
"""Image ids → (id, encoded bytes) pairs, in any order."""


@dataclass(frozen=True, slots=True)
class CacheItem:
    """What the cache needs to know of an image: where its bytes are and what identifies its content."""

    id: int
    sha256: str
    label: str


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    shape: tuple[int, int, int, int]
    built: bool  # False: an existing entry was reused
    build_seconds: float | None

    @property
    def pixels_path(self) -> Path:
        return self.path / "pixels.u8"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def open(self) -> np.ndarray:
        """The pixels, memory-mapped: pages come from the page cache as batches touch them, so a
        dataset larger than RAM still trains. Copy-on-write, so the file itself never changes."""
        if self.nbytes == 0:
            return np.empty(self.shape, dtype=np.uint8)
        return np.memmap(self.pixels_path, dtype=np.uint8, mode="c", shape=self.shape)

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key[:16],
            "hit": not self.built,
            "build_seconds": round(self.build_seconds, 3) if self.build_seconds is not None else None,
            "bytes": self.nbytes,
        }


def cache_key(items: Sequence[CacheItem], *, image_size: int, channels: int) -> str:
    """A hash of everything the pixels depend on: each image's content and label, in row order."""
    digest = hashlib.sha256(f"trainserve-decoded/{FORMAT_VERSION}/{image_size}/{channels}\n".encode())
    # Length-prefixed labels: no label can make two different lists hash alike.
    digest.update("".join(f"{item.sha256}{len(item.label)}:{item.label}\n" for item in items).encode())
    return digest.hexdigest()


def open_or_build(
    cache_dir: Path,
    items: Sequence[CacheItem],
    *,
    image_size: int,
    channels: int,
    fetch: Fetch,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    on_wait: Callable[[], None] = lambda: None,
    processes: int = 0,
    pool_min_images: int = 4096,
    max_bytes: int | None = None,
) -> CacheEntry:
    """The cache entry for `items` at this size, built now if no worker has built it yet.

    `on_wait` is called while another process holds the build lock (it may raise to give up);
    `processes` 0 means one decoding process per CPU core.
    """
    key = cache_key(items, image_size=image_size, channels=channels)
    shape = (len(items), channels, image_size, image_size)
    root = Path(cache_dir) / "decoded"
    entry_dir = root / key
    found = _existing(entry_dir, key, shape)
    if found is not None:
        return found
    (Path(cache_dir) / "locks").mkdir(parents=True, exist_ok=True)
    with _locked(Path(cache_dir) / "locks" / f"{key}.lock", on_wait):
        found = _existing(entry_dir, key, shape)  # built by another worker while we waited
        if found is not None:
            return found
        for stale in root.glob(f".building-{key}-*"):  # a build that crashed: nobody else owns it
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        building = root / f".building-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        building.mkdir(parents=True)
        try:
            workers = processes or os.cpu_count() or 1
            _build(building, items, shape, fetch, on_progress, workers, pool_min_images)
            seconds = time.perf_counter() - started
            _write_json(building / "images.json", [[item.sha256, item.label] for item in items])
            _write_json(
                building / "meta.json",
                {
                    "format": FORMAT_VERSION,
                    "key": key,
                    "shape": list(shape),
                    "dtype": "uint8",
                    "build_seconds": seconds,
                    "created_at": time.time(),
                },
            )
            _fsync_dir(building)
            if entry_dir.exists():  # an invalid leftover (half-deleted, older format)
                shutil.rmtree(entry_dir)
            os.rename(building, entry_dir)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    log.info("decoded-image cache %s: %d images built in %.2f s", key[:16], len(items), seconds)
    entry = CacheEntry(key=key, path=entry_dir, shape=shape, built=True, build_seconds=seconds)
    if max_bytes is not None:
        evict(Path(cache_dir), max_bytes=max_bytes, keep=key)
    return entry


def evict(cache_dir: Path, *, max_bytes: int, keep: str | None = None) -> list[str]:
    """Delete least recently used entries until the cache fits in `max_bytes`; returns their keys.
    Entries being built are skipped; a job still training on a deleted entry keeps its mapping."""
    root = Path(cache_dir) / "decoded"
    entries = []
    for path in root.iterdir() if root.exists() else []:
        if path.name.startswith(".") or not (path / "meta.json").exists():
            continue
        size = (path / "pixels.u8").stat().st_size if (path / "pixels.u8").exists() else 0
        entries.append(((path / "meta.json").stat().st_mtime, path.name, size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, key, size in sorted(entries):
        if total <= max_bytes:
            break
        if key == keep:
            continue
        lock = Path(cache_dir) / "locks" / f"{key}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            doomed = root / f".evicting-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(root / key, doomed)  # atomic: readers see the entry or nothing
            shutil.rmtree(doomed, ignore_errors=True)
        finally:
            os.close(fd)
        total -= size
        removed.append(key)
        log.info("decoded-image cache %s evicted (%d bytes)", key[:16], size)
    return removed


def _existing(entry_dir: Path, key: str, shape: tuple[int, int, int, int]) -> CacheEntry | None:
    """A complete entry with the expected key and shape, or None; marks it recently used."""
    meta_path = entry_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        size = (entry_dir / "pixels.u8").stat().st_size
    except (OSError, ValueError):
        return None
    expected = {"format": FORMAT_VERSION, "key": key, "shape": list(shape)}
    if any(meta.get(name) != value for name, value in expected.items()) or size != math.prod(shape):
        return None
    with contextlib.suppress(OSError):
        os.utime(meta_path)  # least recently used goes first when the cache is full
    return CacheEntry(
        key=key, path=entry_dir, shape=shape, built=False, build_seconds=meta.get("build_seconds")
    )


@contextmanager
def _locked(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                on_wait()
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process dies


def _build(
    directory: Path,
    items: Sequence[CacheItem],
    shape: tuple[int, int, int, int],
    fetch: Fetch,
    on_progress: Callable[[int, int], None],
    processes: int,
    pool_min_images: int,
) -> None:
    pixels = directory / "pixels.u8"
    with open(pixels, "wb") as file:
        file.truncate(math.prod(shape))
    row_of = {item.id: row for row, item in enumerate(items)}
    total, done = len(items), 0
    on_progress(0, total)
    chunks = ([item.id for item in items[start : start + CHUNK]] for start in range(0, len(items), CHUNK))

    def tasks() -> Iterator[tuple[list[int], list[int], list[bytes]]]:
        for ids in chunks:
            rows = list(fetch(ids))
            yield (
                [row_of[image_id] for image_id, _ in rows],
                [image_id for image_id, _ in rows],
                [data for _, data in rows],
            )

    if total == 0:
        return
    if processes > 1 and total >= pool_min_images:
        # Spawned, not forked: the worker has threads (heartbeat, database pool) that a fork would copy
        # mid-flight. The children import only Pillow and NumPy.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=processes, mp_context=context, initializer=_ignore_interrupts
        ) as pool:
            pending: set[Future[int]] = set()
            for rows, ids, blobs in tasks():
                pending.add(pool.submit(decode_into_file, str(pixels), shape, rows, ids, blobs))
                while len(pending) >= 2 * processes:  # bounded: encoded bytes never pile up in memory
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    done += sum(future.result() for future in finished)
                    on_progress(done, total)
            for future in pending:
                done += future.result()
    else:
        for rows, ids, blobs in tasks():
            done += decode_into_file(str(pixels), shape, rows, ids, blobs)
            on_progress(done, total)
    on_progress(done, total)
    if done != total:
        raise RuntimeError(f"{total - done} images disappeared from the dataset while caching it")
    with open(pixels, "rb+") as file:
        os.fsync(file.fileno())


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group: the worker decides what happens (requeue the job), so a
    decoding child must not die of it first and turn the job into a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_open_files: dict[str, np.memmap] = {}


def decode_into_file(
    path: str, shape: tuple[int, int, int, int], rows: list[int], ids: list[int], blobs: list[bytes]
) -> int:
    """Decode `blobs` into rows `rows` of the pixel file (runs in a child process); returns the count."""
    pixels = _open_files.get(path)
    if pixels is None:
        if len(_open_files) > 4:
            _open_files.clear()
        pixels = _open_files[path] = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    channels, size = shape[1], shape[2]
    for row, image_id, data in zip(rows, ids, blobs, strict=True):
        try:
            pixels[row] = decode_pixels(data, channels=channels, image_size=size)
        except ValueError as exc:
            raise RuntimeError(f"image {image_id} cannot be decoded: {exc}") from None
    pixels.flush()
    return len(rows)


def decode_pixels(data: bytes, *, channels: int, image_size: int) -> np.ndarray:
    """Exactly `models.preprocessing.to_uint8(decode_image(data))`, without torch for images already at
    the model's size (torch, and its resize, only load in a process that meets another size)."""
    image = decode_image(data)
    if image.size == (image_size, image_size):
        return to_pixels(image, channels)
    from models.preprocessing import Preprocessing, to_uint8  # torch: resizing must match serving's

    preprocessing = Preprocessing(
        image_size=image_size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels
    )
    return to_uint8(image, preprocessing).numpy()


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as file:
        json.dump(value, file)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
