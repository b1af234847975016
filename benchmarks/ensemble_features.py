"""Benchmark: the packaged Lite backbones' features at ONE common input size, alone and
concatenated (what an ensemble model computes), each scored by the head a pretrained run fits
(:func:`convlens.engine.transfer.fit_head`: L2 by 5-fold CV on the training rows, no class
weights) on the validation split of ``prepare_dataset`` (seed 1337). Deterministic given the
features, which are cached (``--cache-dir``), so repeats cost a read.

    python benchmarks/ensemble_features.py                        # 260 px (Lite2's), all three
    python benchmarks/ensemble_features.py --size-of efficientnet_lite1 \\
        --backbones efficientnet_lite0 efficientnet_lite1           # 240 px, Lite0 + Lite1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DATASETS = ["cat_breeds5", "imagenette8", "cats_and_dogs_filtered"]
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS, help="folders under ../shared/datasets (or paths)")
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--size-of", default="efficientnet_lite2", help="the backbone whose preprocessing all share")
    p.add_argument("--cache-dir", default=None, help="decode and feature cache (default: convlens's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from convlens.data.cache import CachedImages
    from convlens.data.prepare import prepare_dataset
    from convlens.engine.features import cached_features, load_pretrained, subset_hashes
    from convlens.engine.transfer import fit_head, head_logits

    print("\n".join(common.machine_lines()), flush=True)
    prep = load_pretrained(args.size_of).preprocessing
    rows_out = []
    for d in args.datasets:
        root = Path(d) if Path(d).is_dir() else common.CATS_DOGS.parent / d
        prepared = prepare_dataset(root, prep, val_fraction=0.2, seed=1337, cache_dir=args.cache_dir)
        feats = {}
        for name in args.backbones:  # each backbone at the common size: what an ensemble member sees
            backbone = dataclasses.replace(load_pretrained(name), preprocessing=prep)
            t = time.perf_counter()
            feats[name] = [cached_features(backbone, CachedImages(prepared.cache.array, np.array(
                [prepared.cache.rows[q] for q in s.paths], dtype=np.int64)), subset_hashes(prepared, s.paths),
                prepared.root, prep=prep, cache_dir=args.cache_dir) for s in (prepared.train, prepared.val)]
            print(f"  {root.name} {name}: {time.perf_counter() - t:.1f}s", flush=True)
        ty, vy, k = prepared.train.labels, prepared.val.labels, len(prepared.classes)
        combos = [list(c) for n in range(1, len(args.backbones) + 1) for c in itertools.combinations(args.backbones, n)]
        for combo in combos:
            w, b, choice = fit_head(np.concatenate([feats[n][0] for n in combo], 1), ty, k)
            logits = head_logits(np.concatenate([feats[n][1] for n in combo], 1), w, b)
            pred = (logits[:, 0] > 0).astype(int) if k == 2 else logits.argmax(1)
            rows_out.append([root.name, "+".join(combo), f"{100 * float((pred == vy).mean()):.2f}%",
                             f"{100 * choice.cv_accuracy:.2f}%", f"{choice.l2:g}"])
            print("  " + "  ".join(rows_out[-1]), flush=True)
    print(common.table(["dataset", "features", "val acc", "5-fold CV on train", "L2"], rows_out))


if __name__ == "__main__":
    main()
