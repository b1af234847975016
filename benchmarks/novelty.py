"""Novelty and calibration on real photos (issue 21 point 4): for a model per shared dataset, how
well each novelty score separates its own kind of photos from foreign ones, the unknown rates at
the default threshold, ECE before/after the temperature, the bundle bytes and the latency added.

The model is the default pretrained run's (Lite0 features, the head ``select_head`` chooses, its
temperature from the out-of-fold logits), rebuilt from the shared feature cache, so the numbers are
the ones ``convlens train DIR`` gives. The validation photos are split in two: the even ones choose
the threshold (as training does), the odd ones measure the known rate on photos nothing was fitted
or chosen on; because one split of a few hundred photos is noisy (a 95% cut-off estimated on 500
photos keeps 92-97% of another 500), the own-kind unknown rate is also given as the median and
range over :data:`SPLITS` random halvings. Foreign photos: the other shared datasets' classes that are not the model's kind.

    python benchmarks/novelty.py            # all three; ~1 min each when the features are cached
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from convlens.decision import activation_for, probabilities
from convlens.engine.features import folder_features
from convlens.engine.transfer import fit_linear_head, head_logits, select_head
from convlens.evaluate.calibration import ece_of, fit_temperature
from convlens.infer.novelty import build_index
from convlens.models import create

DATA = Path("/work/shared/datasets")
# model dataset -> (foreign dataset, classes of it that are NOT foreign to the model)
FOREIGN = {
    "cats_and_dogs_filtered": [("imagenette8", {"english_springer"})],
    "cat_breeds5": [("imagenette8", set()), ("cats_and_dogs_filtered", {"cats"})],
    "imagenette8": [("cats_and_dogs_filtered", {"dogs"}), ("cat_breeds5", set())],
}


def foreign_features(name: str, cache: dict) -> np.ndarray:
    parts = []
    for other, keep_out in FOREIGN[name]:
        fs = cache.setdefault(other, folder_features(DATA / other))
        parts.append(fs.features[[fs.classes[y] not in keep_out for y in fs.labels]])
    return np.concatenate(parts)


def mahalanobis(train: np.ndarray, labels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Distance to the nearest class mean under a shared, shrunk covariance (Lee et al. 2018)."""
    means = np.stack([train[labels == c].mean(0) for c in np.unique(labels)])
    centred = train - means[labels]
    cov = np.cov(centred, rowvar=False) + 1e-3 * np.eye(train.shape[1]) * np.trace(np.cov(centred, rowvar=False)) / train.shape[1]
    prec = np.linalg.inv(cov)
    d = [np.einsum("ij,jk,ik->i", x - m, prec, x - m) for m in means]
    return np.min(np.stack(d), axis=0)


SPLITS = 20  # random halvings of the validation photos for the own-kind unknown rate


def split_rates(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, seed: int = 0) -> list[float]:
    """The own-kind unknown rate when one random half of the validation photos chooses the
    threshold and the other half is measured, for each of :data:`SPLITS` halvings."""
    rng, rates = np.random.default_rng(seed), []
    for _ in range(SPLITS):
        perm = rng.permutation(len(xva))
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        index = build_index(xtr, ytr, [str(i) for i in range(len(ytr))], xva[a])
        rates.append(float(np.mean(index.scores(xva[b]) > index.threshold)))
    return rates


def measure(name: str, cache: dict) -> dict:
    fs = cache.setdefault(name, folder_features(DATA / name))
    sub = np.asarray(fs.subsets)
    tr, va = sub == "train", sub != "train"
    xtr, ytr, xva, yva = fs.features[tr], fs.labels[tr], fs.features[va], fs.labels[va]
    n = len(fs.classes)
    t0 = time.perf_counter()
    choice = select_head(xtr, ytr, n)
    w, b = fit_linear_head(xtr, ytr, n, l2=choice.l2)
    temperature = fit_temperature(choice.oof_logits, ytr)
    head_s = time.perf_counter() - t0
    zva = head_logits(xva, w, b)
    pred = zva[:, 0] > 0 if zva.shape[1] == 1 else zva.argmax(1)
    ood = foreign_features(name, cache)
    zood = head_logits(ood, w, b)
    choose, held = xva[0::2], xva[1::2]
    index = build_index(xtr, ytr, [str(i) for i in range(len(ytr))], choose)
    y_true = np.r_[np.zeros(len(held)), np.ones(len(ood))]

    def logit_scores(z: np.ndarray) -> dict[str, np.ndarray]:
        p = probabilities(z / temperature, activation_for(z.shape[1]))
        full = np.c_[np.zeros(len(z)), z] if z.shape[1] == 1 else z  # one unit: the logits of [0, z]
        return {"energy": -np.log(np.exp(full / temperature).sum(1)), "max-probability": -p.max(1)}

    scores = {"kNN distance (chosen)": np.r_[index.scores(held), index.scores(ood)],
              "Mahalanobis": np.r_[mahalanobis(xtr, ytr, held), mahalanobis(xtr, ytr, ood)]}
    lh, lo = logit_scores(zva[1::2]), logit_scores(zood)
    scores.update({k: np.r_[lh[k], lo[k]] for k in lh})
    # latency: the model's forward pass per image against the index search per image
    model = create("efficientnet_lite0", n).eval()
    img = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        model(img)
        fwd = np.median([_timed(lambda: model(img)) for _ in range(10)])
    search = np.median([_timed(lambda: index.scores(held[:1])) for _ in range(50)])
    return {"name": name, "val_acc": float((pred == yva).mean()), "l2": choice.l2, "cv": choice.cv_accuracy,
            "T": temperature, "ece": (ece_of(zva, yva), ece_of(zva, yva, temperature)), "head_s": head_s,
            "auroc": {k: roc_auc_score(y_true, v) for k, v in scores.items()},
            "unknown_own": float(np.mean(index.scores(held) > index.threshold)),
            "unknown_own_splits": split_rates(xtr, ytr, xva),
            "unknown_foreign": float(np.mean(index.scores(ood) > index.threshold)),
            "foreign": len(ood), "own": len(held), "threshold": index.threshold,
            "bundle_mb": index.reference.nbytes / 1e6, "forward_ms": fwd * 1e3, "search_ms": search * 1e3}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("datasets", nargs="*", default=list(FOREIGN))
    args = p.parse_args()
    torch.set_num_threads(2)
    cache: dict = {}
    for name in args.datasets:
        r = measure(name, cache)
        auroc = ", ".join(f"{k} {v:.4f}" for k, v in r["auroc"].items())
        print(f"{name}: val_acc {r['val_acc']:.4f} (L2 {r['l2']:g}, cv {r['cv']:.4f}, head {r['head_s']:.1f}s) "
              f"T {r['T']:.3f} ECE {r['ece'][0]:.4f} -> {r['ece'][1]:.4f} | AUROC {auroc} | threshold "
              f"{r['threshold']:.4f}: unknown {r['unknown_own']:.1%} of {r['own']} own (median of {SPLITS} random "
              f"halvings {np.median(r['unknown_own_splits']):.1%}, {min(r['unknown_own_splits']):.1%}-"
              f"{max(r['unknown_own_splits']):.1%}), {r['unknown_foreign']:.1%} "
              f"of {r['foreign']} foreign | novelty section {r['bundle_mb']:.1f} MB | forward {r['forward_ms']:.1f} ms"
              f" + search {r['search_ms']:.2f} ms per image", flush=True)


if __name__ == "__main__":
    main()
