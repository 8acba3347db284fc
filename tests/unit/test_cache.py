"""The decoded-image cache: pixels equal to the serving path's, reuse, rebuilds, concurrent builders."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocessing import Preprocessing, decode_image, to_uint8
from tests.factories import encode, image_bytes, noise_png
from workers.cache import CacheItem, cache_key, evict, open_or_build


def mixed_images() -> list[bytes]:
    """Every kind of image the decoder handles: sizes to resize, colour, alpha, palette, 16-bit."""
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, 20).astype(np.uint16), (20, 1)))
    palette = Image.new("P", (10, 14), 3)
    palette.info["transparency"] = 3
    return [
        noise_png(1, (8, 8)),  # already at the target size
        noise_png(2, (13, 9)),  # resized
        noise_png(3, (8, 8), mode="RGB"),
        noise_png(4, (30, 20), mode="RGB"),
        image_bytes((8, 8), mode="RGBA", color=(10, 200, 30, 0)),
        encode(palette),
        encode(sixteen),
        image_bytes((8, 8), mode="RGB", color=(1, 2, 3), fmt="JPEG"),
    ]


class Store:
    """A stand-in for the image table: ids → bytes, counting what the cache asks for."""

    def __init__(self, blobs: Sequence[bytes], labels: Sequence[str] | None = None) -> None:
        self.blobs = {index + 100: data for index, data in enumerate(blobs)}
        self.labels = list(labels) if labels is not None else ["a"] * len(blobs)
        self.fetched = 0

    def items(self) -> list[CacheItem]:
        return [
            CacheItem(id=image_id, sha256=hashlib.sha256(data).hexdigest(), label=label)
            for (image_id, data), label in zip(self.blobs.items(), self.labels, strict=True)
        ]

    def fetch(self, ids: Sequence[int]) -> list[tuple[int, bytes]]:
        self.fetched += len(ids)
        return [(image_id, self.blobs[image_id]) for image_id in reversed(ids)]  # any order is fine


def build(cache_dir: Path, store: Store, *, size: int = 8, channels: int = 1, **options: object):  # type: ignore[no-untyped-def]
    return open_or_build(
        cache_dir, store.items(), image_size=size, channels=channels, fetch=store.fetch, **options
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_cached_pixels_equal_the_serving_decode(tmp_path: Path, channels: int) -> None:
    blobs = mixed_images()
    entry = build(tmp_path, Store(blobs), channels=channels)
    pixels = torch.from_numpy(np.asarray(entry.open()))
    assert pixels.shape == (len(blobs), channels, 8, 8) and pixels.dtype == torch.uint8
    preprocessing = Preprocessing(
        image_size=8, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels
    )
    for row, data in enumerate(blobs):
        assert torch.equal(pixels[row], to_uint8(decode_image(data), preprocessing)), f"image {row}"
    assert (entry.path / "pixels.u8").stat().st_size == len(blobs) * channels * 64  # no header, no padding


def test_process_pool_build_matches_the_in_process_build(tmp_path: Path) -> None:
    # Images at the target size: the spawned children decode them without importing torch.
    blobs = [noise_png(seed, (8, 8), mode="RGB" if seed % 3 else "L") for seed in range(60)]
    store = Store(blobs)
    in_process = build(tmp_path / "one", store, processes=1)
    pooled = build(tmp_path / "pool", store, processes=2, pool_min_images=1)
    assert pooled.built and pooled.key == in_process.key
    assert np.array_equal(np.asarray(pooled.open()), np.asarray(in_process.open()))


def test_progress_is_reported_up_to_the_total(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    build(
        tmp_path, Store([noise_png(seed) for seed in range(5)]), on_progress=lambda d, t: seen.append((d, t))
    )
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)


def test_a_second_job_reuses_the_entry_without_reading_an_image(tmp_path: Path) -> None:
    first = build(tmp_path, Store([noise_png(seed) for seed in range(6)]))
    again = Store([noise_png(seed) for seed in range(6)])
    second = build(tmp_path, again)
    assert first.built and not second.built
    assert again.fetched == 0
    assert second.path == first.path
    assert second.build_seconds == pytest.approx(first.build_seconds)
    meta = json.loads((second.path / "meta.json").read_text())
    assert meta["shape"] == [6, 1, 8, 8] and meta["key"] == first.key
    assert json.loads((second.path / "images.json").read_text())[0] == [again.items()[0].sha256, "a"]


def test_changed_images_labels_size_or_channels_get_a_new_entry(tmp_path: Path) -> None:
    blobs = [noise_png(seed) for seed in range(6)]
    base = build(tmp_path, Store(blobs))
    for changed, options in [
        (Store([*blobs, noise_png(99)]), {}),  # an image added
        (Store([*blobs[:5], noise_png(98)]), {}),  # an image replaced
        (Store(blobs, labels=["a"] * 5 + ["b"]), {}),  # a label changed
        (Store(blobs), {"size": 10}),
        (Store(blobs), {"channels": 3}),
    ]:
        entry = build(tmp_path, changed, **options)  # type: ignore[arg-type]
        assert entry.built and entry.key != base.key and changed.fetched == len(changed.blobs)
    assert not build(tmp_path, Store(blobs)).built, "the original entry is still there"


def test_cache_key_depends_on_order_and_every_field() -> None:
    items = Store([noise_png(seed) for seed in range(3)]).items()
    key = cache_key(items, image_size=8, channels=1)
    assert key == cache_key(list(items), image_size=8, channels=1)
    assert key != cache_key(items[::-1], image_size=8, channels=1)
    assert key != cache_key(items, image_size=9, channels=1)
    assert key != cache_key(items, image_size=8, channels=3)


def test_a_damaged_entry_is_rebuilt(tmp_path: Path) -> None:
    store = Store([noise_png(seed) for seed in range(4)])
    entry = build(tmp_path, store)
    expected = np.asarray(entry.open()).copy()
    with open(entry.pixels_path, "r+b") as file:
        file.truncate(10)
    rebuilt = build(tmp_path, store)
    assert rebuilt.built
    assert np.array_equal(np.asarray(rebuilt.open()), expected)


def test_leftovers_of_a_crashed_build_are_removed(tmp_path: Path) -> None:
    store = Store([noise_png(seed) for seed in range(3)])
    key = cache_key(store.items(), image_size=8, channels=1)
    crashed = tmp_path / "decoded" / f".building-{key}-12345-deadbeef"
    crashed.mkdir(parents=True)
    (crashed / "pixels.u8").write_bytes(b"\0" * 7)
    entry = build(tmp_path, store)
    assert entry.built and not crashed.exists()
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == [key]


def test_a_failing_build_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store([noise_png(1), b"not an image at all"])
    with pytest.raises(RuntimeError, match="image 101 cannot be decoded"):
        build(tmp_path, store)
    assert list((tmp_path / "decoded").iterdir()) == []


def test_least_recently_used_entries_are_evicted_beyond_the_limit(tmp_path: Path) -> None:
    stores = [Store([noise_png(100 * k + seed) for seed in range(4)]) for k in range(3)]  # 256 bytes each
    entries = [build(tmp_path, store) for store in stores]
    old = time.time() - 100

    os.utime(entries[0].path / "meta.json", (old, old))  # entry 0 is the least recently used
    build(tmp_path, stores[1])  # a use refreshes entry 1
    assert evict(tmp_path, max_bytes=600) == [entries[0].key]
    assert evict(tmp_path, max_bytes=600) == []
    newest = build(tmp_path, Store([noise_png(999)]), max_bytes=64)
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == [newest.key], "all but the new one"


def _build_in_a_process(cache_dir: str, seeds: list[int], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = Store([noise_png(seed) for seed in seeds])
    original = store.fetch

    def slow_fetch(ids: Sequence[int]) -> list[tuple[int, bytes]]:
        time.sleep(0.3)  # a build slow enough for the other process to arrive while it runs
        return original(ids)

    waits = []
    entry = open_or_build(
        Path(cache_dir),
        store.items(),
        image_size=8,
        channels=1,
        fetch=slow_fetch,
        on_wait=lambda: waits.append(1),
    )
    out.put((entry.built, entry.key, store.fetched, len(waits), np.asarray(entry.open()).tobytes()))


def test_two_workers_building_the_same_entry_decode_it_once(tmp_path: Path) -> None:
    seeds = list(range(2500))  # three chunks, each with a pause
    context = multiprocessing.get_context("fork")  # the children run cache code only, never torch
    out = context.Queue()
    processes = [
        context.Process(target=_build_in_a_process, args=(str(tmp_path), seeds, out)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    results = [out.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    built = sorted(results, key=lambda r: not r[0])
    assert [r[0] for r in built] == [True, False], "exactly one process decoded"
    assert built[0][2] == len(seeds) and built[1][2] == 0, "the other read no image"
    assert built[1][3] > 0, "it waited on the lock"
    assert built[0][1] == built[1][1] and built[0][4] == built[1][4]
    assert [p.name for p in (tmp_path / "decoded").iterdir()] == [built[0][1]]


def test_a_build_stopped_from_its_progress_callback_leaves_nothing_behind(tmp_path: Path) -> None:
    class Cancelled(Exception):
        pass

    def cancel_after_first_chunk(done: int, total: int) -> None:
        if done > 0:
            raise Cancelled

    store = Store([noise_png(seed) for seed in range(1500)])  # two chunks
    with pytest.raises(Cancelled):
        build(tmp_path, store, on_progress=cancel_after_first_chunk)
    assert list((tmp_path / "decoded").iterdir()) == []
    assert build(tmp_path, store).built, "the next job builds it whole"
