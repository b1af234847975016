"""Benchmark 10: what a pretrained run could spend a time budget on (issue 24, points 2-4).

For each dataset, the head-only validation accuracy of the packaged backbones' cached features
(Lite0, Lite1, Lite2), with flip-augmented training rows, with flip-averaged prediction, and of
the concatenation of several backbones' features; each scored by convlens's head
(:func:`convlens.engine.transfer.fit_linear_head`, its default L2) and by a scikit-learn probe
(``LogisticRegressionCV`` on standardised features, C in 1e-4..1 by 3-fold CV on the training
rows alone), in the same script. The accuracies are deterministic given the features (the feature cache
makes repeats cheap). The extraction cost is measured apart: img/s of each backbone's bf16
feature pass on 64 images at its own size, the median of ``--repeats`` passes.

    python benchmarks/pretrained_options.py
    python benchmarks/pretrained_options.py --datasets cat_breeds5 --flip-backbones
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DATASETS = ["cat_breeds5", "imagenette8", "cats_and_dogs_filtered"]
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
SHORT = {"efficientnet_lite0": "L0", "efficientnet_lite1": "L1", "efficientnet_lite2": "L2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS, help="folders under ../shared/datasets (or paths)")
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--flip-backbones", nargs="*", default=["efficientnet_lite0"],
                   help="backbones whose flipped features are computed too (the flip rows and averages)")
    p.add_argument("--repeats", type=int, default=3, help="timed feature passes per backbone (median)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def feature_speed(backbone_name: str, repeats: int, n: int = 64) -> float:
    """img/s of the bf16 feature pass at the backbone's own size (median of ``repeats``)."""
    from convlens.engine.features import extract_features, load_pretrained

    bb = load_pretrained(backbone_name)
    side = bb.preprocessing.size[0]
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    extract_features(bb.model, images[:8], bb.preprocessing)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        extract_features(bb.model, images, bb.preprocessing)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def convlens_head(tx: np.ndarray, ty: np.ndarray, k: int, vxs: list[np.ndarray]) -> np.ndarray:
    """Validation logits (averaged over the views ``vxs``) of convlens's fitted head."""
    from convlens.engine.transfer import fit_linear_head

    w, b = fit_linear_head(tx, ty, k)
    w, b = w.numpy(), b.numpy()
    logits = np.mean([v @ w.T + b for v in vxs], axis=0)
    return (logits[:, 0] > 0).astype(int) if k == 2 else logits.argmax(1)


def probe(tx: np.ndarray, ty: np.ndarray, vxs: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Predictions of a LogisticRegressionCV probe (C in 1e-4..1 by 3-fold CV on the training rows) and its C."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 0, 5).tolist(), cv=3,
                                                                 max_iter=300, tol=1e-3))
    with warnings.catch_warnings():  # scikit-learn's notices of future defaults
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(tx, ty)
    proba = np.mean([model.predict_proba(v) for v in vxs], axis=0)
    return proba.argmax(1), float(model[-1].C_[0])


def dataset_features(root: Path, backbones: list[str], flip: list[str]) -> dict[str, Any]:
    """Per backbone: (train, val) features plain and flipped, labels; and the seconds it took."""
    from convlens.engine.features import folder_features

    out: dict[str, Any] = {}
    for name in backbones:
        for f in (False, True) if name in flip else (False,):
            t = time.perf_counter()
            fs = folder_features(root, name, flip=f)
            sub = np.array(fs.subsets)
            out[(name, f)] = (fs.features[sub == "train"], fs.features[sub != "train"], fs.labels[sub == "train"],
                              fs.labels[sub != "train"], len(fs.classes))
            print(f"  {root.name} {name} flip={f}: {len(sub)} images, {time.perf_counter() - t:.1f}s "
                  f"(features {fs.seconds['features']:.1f}s)", flush=True)
    return out


def score(feats: dict[Any, Any], names: list[str], flip_rows: bool, flip_avg: bool) -> dict[str, Any]:
    """Validation accuracy of the head and the probe on the concatenated features of ``names``."""
    def cat(f: bool, part: int) -> np.ndarray:
        return np.concatenate([feats[(n, f)][part] for n in names], axis=1)

    _, _, ty, vy, k = feats[(names[0], False)]
    tx, vxs = cat(False, 0), [cat(False, 1)]
    if flip_rows:
        tx, ty = np.concatenate([tx, cat(True, 0)]), np.concatenate([ty, ty])
    if flip_avg:
        vxs.append(cat(True, 1))
    t = time.perf_counter()
    head = float((convlens_head(tx, ty, k, vxs) == vy).mean())
    head_s = time.perf_counter() - t
    pred, c = probe(tx, ty, vxs)
    return {"head": head, "head_s": head_s, "probe": float((pred == vy).mean()), "probe_C": c, "n_val": len(vy)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import convlens.engine.transfer  # noqa: F401  (imported whole now: the run takes minutes)
    print("\n".join(common.machine_lines()), flush=True)
    speeds = {b: feature_speed(b, args.repeats) for b in args.backbones}
    print("feature img/s:", {SHORT.get(b, b): round(s, 1) for b, s in speeds.items()}, flush=True)
    results: list[dict[str, Any]] = []
    for d in args.datasets:
        root = Path(d) if Path(d).is_dir() else common.CATS_DOGS.parent / d
        feats = dataset_features(root, args.backbones, args.flip_backbones)
        combos = [[b] for b in args.backbones] + [args.backbones[:2], args.backbones[::2], args.backbones]
        for names in combos if len(args.backbones) == 3 else [[b] for b in args.backbones]:
            for flip_rows, flip_avg in ((False, False), (True, False), (True, True)):
                if (flip_rows or flip_avg) and not all((n, True) in feats for n in names):
                    continue
                r = score(feats, names, flip_rows, flip_avg)
                r.update(dataset=root.name, features="+".join(SHORT.get(n, n) for n in names), flip_rows=flip_rows,
                         flip_avg=flip_avg, cost_s_per_img=sum(1 / speeds[n] for n in names) * (2 if flip_rows else 1))
                results.append(r)
                print(f"  {r['features']:9s} flip rows {flip_rows!s:5s} flip avg {flip_avg!s:5s}  "
                      f"head {r['head']:.4f}  probe {r['probe']:.4f} (C={r['probe_C']:.2g})", flush=True)
    print(common.table(
        ["dataset", "features", "flip rows", "flip-averaged val", "head acc", "probe acc (C)", "feature s / 1000 img"],
        [[r["dataset"], r["features"], "yes" if r["flip_rows"] else "no", "yes" if r["flip_avg"] else "no",
          f"{100 * r['head']:.1f}%", f"{100 * r['probe']:.1f}% ({r['probe_C']:.2g})",
          f"{1000 * r['cost_s_per_img']:.0f}"] for r in results]))
    if args.json:
        Path(args.json).write_text(json.dumps({"speeds": speeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
