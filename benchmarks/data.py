"""Data pipeline benchmark (not a test): decode-once cache vs decoding JPEGs every epoch.

    python benchmarks/data.py                      # cats_and_dogs_filtered at 300 px
    python benchmarks/data.py --limit 200          # smoke run

Measures (1) the cache build rate (images/s, all cores), (2) one epoch of batches read from the
memory-mapped cache, (3) one epoch of decoding + resizing the same files with the same decoder,
both in one process, and prints the ratio. Goal: a cached epoch at least 20x faster.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from convlens.data.cache import build_cache
from convlens.data.loader import BatchLoader, to_model_input
from convlens.data.parallel import resolve_workers
from convlens.data.prepare import Subset
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import scan
from convlens.errors import ImageError
from convlens.files import human_bytes

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cats_and_dogs_filtered"
GOAL = 20.0


def _epoch_cached(subset: Subset, batch_size: int) -> float:
    """One epoch of shuffled uint8 batches (CPU tensors) read from the memory-mapped cache."""
    loader = BatchLoader(subset, batch_size=batch_size, shuffle=True, seed=0)
    t = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    assert n == len(subset)
    return time.perf_counter() - t


def _epoch_decoding(paths: list[Path], labels: np.ndarray, batch_size: int, prep: Preprocessing) -> float:
    """The same epoch when every file is decoded and resized again (what a plain loader does)."""
    order = np.random.default_rng(0).permutation(len(paths))
    t = time.perf_counter()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        torch.from_numpy(np.stack([prep.load(paths[i]) for i in idx]))
        torch.from_numpy(labels[idx])
    return time.perf_counter() - t


def _epoch_normalize(subset: Subset, batch_size: int, prep: Preprocessing) -> float:
    """uint8 -> float model input for an epoch: paid by both, shown for scale."""
    loader = BatchLoader(subset, batch_size=batch_size, shuffle=False)
    batches = [x for x, _ in zip(loader, range(4), strict=False)]
    t = time.perf_counter()
    for x, _ in batches:
        to_model_input(x, prep)
    return (time.perf_counter() - t) / max(1, sum(len(x) for x, _ in batches)) * len(subset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder")
    ap.add_argument("--size", type=int, default=300, help="image size")
    ap.add_argument("--limit", type=int, default=0, help="use at most this many files (0 = all)")
    ap.add_argument("--workers", type=int, default=0, help="cache-build processes (0 = all cores)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-dir", default=None, help="cache folder (default: a fresh temporary one)")
    a = ap.parse_args()

    index = scan(a.data)
    entries = index.entries
    if a.limit and a.limit < len(entries):
        entries = entries[:: max(1, len(entries) // a.limit)][: a.limit]  # spread over classes
    prep = Preprocessing(size=(a.size, a.size))
    print(f"dataset: {index.root} ({len(entries)} files, {len(index.classes)} classes), {a.size}x{a.size}, "
          f"batch {a.batch_size}, {resolve_workers(a.workers)} build workers")

    with tempfile.TemporaryDirectory(prefix="convlens-bench-") as tmp:
        cache_dir = Path(a.cache_dir) if a.cache_dir else Path(tmp)
        t = time.perf_counter()
        cache = build_cache(entries, index.root, size=(a.size, a.size), channels=3, cache_dir=cache_dir,
                            workers=a.workers, progress=False)
        build_s = time.perf_counter() - t
        usable = [e for e in entries if e.rel in cache.rows]
        rels = [e.rel for e in usable]
        labels = np.array([e.label for e in usable], dtype=np.int64)
        subset = Subset(images=cache.images(rels), labels=labels, paths=rels)
        n = len(usable)
        print(f"cache build:      {build_s:8.2f} s  {cache.decoded / build_s:8.1f} img/s  "
              f"({cache.decoded} decoded, {human_bytes(cache.nbytes)})")

        cached_s = min(_epoch_cached(subset, a.batch_size) for _ in range(2))
        print(f"epoch from cache: {cached_s:8.3f} s  {n / cached_s:8.1f} img/s")
        paths = [e.path for e in usable]
        try:
            decode_s = _epoch_decoding(paths, labels, a.batch_size, prep)
        except ImageError as e:  # cannot happen for files the cache accepted, but say so clearly
            raise SystemExit(f"decode failed: {e}") from e
        print(f"epoch decoding:   {decode_s:8.3f} s  {n / decode_s:8.1f} img/s")
        norm_s = _epoch_normalize(subset, a.batch_size, prep)
        print(f"(uint8 -> float input, paid by both: {norm_s:.3f} s per epoch on this CPU; on a GPU it runs on the device)")
        ratio = decode_s / cached_s
        verdict = "meets" if ratio >= GOAL else "MISSES"
        print(f"ratio: cached epoch is {ratio:.1f}x faster than re-decoding ({verdict} the {GOAL:g}x goal)")


if __name__ == "__main__":
    main()
