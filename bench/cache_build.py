"""Decoded-image cache build: one process, a thread pool, or the process pool the worker uses?

Decodes the same N generated 28x28 grayscale PNGs (digit-derived, as bench/train_throughput.py makes
them) into the cache's memory-mapped layout three ways, in one run, and prints images/s and ratios:

  serial   `open_or_build(processes=1)`: decoding in the worker process itself;
  threads  the same decode function over a ThreadPoolExecutor with one thread per core (Pillow releases
           the GIL while it inflates, but the per-image Python work holds it);
  pool     `open_or_build()` as the worker runs it: spawned processes, one per core, that never import
           torch, each writing its rows into the shared file.

    .venv/bin/python bench/cache_build.py               # 60,000 images
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from workers.cache import CacheItem, decode_pixels, open_or_build


def generate(count: int, seed: int = 0) -> list[bytes]:
    from sklearn.datasets import load_digits  # here: the spawned decoders re-import this module

    digits = load_digits()
    upsampled = [
        np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR))
        for image in digits.images
    ]
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(count):
        frame = np.zeros((28, 28), dtype=np.float32)
        dy, dx = rng.integers(0, 9, size=2)
        frame[dy : dy + 20, dx : dx + 20] = upsampled[i % len(upsampled)]
        frame += rng.normal(0, 6, size=frame.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8), "L").save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60_000)
    args = parser.parse_args()
    blobs = generate(args.images)
    by_id = dict(enumerate(blobs))
    items = [CacheItem(id=i, sha256=hashlib.sha256(b).hexdigest(), label="x") for i, b in by_id.items()]

    def fetch(ids: Sequence[int]) -> list[tuple[int, bytes]]:
        return [(i, by_id[i]) for i in ids]

    cores = os.cpu_count() or 1
    print(f"{args.images} PNGs, {cores} cores, load average {os.getloadavg()[0]:.2f}")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        open_or_build(Path(tmp, "serial"), items, image_size=28, channels=1, fetch=fetch, processes=1)
        rates["serial"] = args.images / (time.perf_counter() - started)

        out = np.empty((args.images, 1, 28, 28), dtype=np.uint8)

        def decode_range(rows: range) -> None:
            for row in rows:
                out[row] = decode_pixels(blobs[row], channels=1, image_size=28)

        started = time.perf_counter()
        step = 1024
        with ThreadPoolExecutor(max_workers=cores) as pool:
            list(
                pool.map(
                    decode_range, [range(s, min(s + step, args.images)) for s in range(0, args.images, step)]
                )
            )
        rates["threads"] = args.images / (time.perf_counter() - started)

        started = time.perf_counter()
        open_or_build(Path(tmp, "pool"), items, image_size=28, channels=1, fetch=fetch, pool_min_images=1)
        rates["pool"] = args.images / (time.perf_counter() - started)
    for name, rate in rates.items():
        seconds = args.images / rate
        print(f"{name:8s} {rate:8,.0f} images/s  {seconds:5.2f} s   x{rate / rates['serial']:.2f} vs serial")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
