"""Data-audit benchmark (not a test): time to audit 2,000 photos, and how well it finds planted errors.

    python benchmarks/audit.py                    # cats_and_dogs_filtered/train, 40 planted errors
    python benchmarks/audit.py --data ../shared/datasets/cat_breeds5 --plant 0   # what it finds

Copies the photos into a temporary folder, moves ``--plant`` of them into a wrong class folder
(half each way for two classes), then audits twice: with an empty cache (decode + features +
findings) and again with everything cached (findings only). Prints the times against the goals
(60 s cold, 10 s cached), recall at N (planted errors among the N most suspicious), the
precision of the flagged set, and the first findings of each kind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from convlens.audit import audit_dataset
from convlens.data.scan import scan

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cats_and_dogs_filtered" / "train"
GOAL_COLD, GOAL_CACHED = 60.0, 10.0


def plant(root: Path, n: int, seed: int) -> set[str]:
    """Move ``n`` random photos into another class folder (never overwriting); return their new paths."""
    index = scan(root)
    rng = np.random.default_rng(seed)
    planted = set()
    for i in rng.choice(len(index.entries), n, replace=False):
        e = index.entries[int(i)]
        others = [c for c in index.classes if c != e.class_name]
        dst = root / others[int(rng.integers(len(others)))] / e.path.name
        if dst.exists():
            continue
        shutil.move(e.path, dst)
        planted.add(dst.relative_to(root).as_posix())
    return planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--plant", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / a.data.name
        shutil.copytree(a.data, root)
        planted = plant(root, a.plant, a.seed) if a.plant else set()
        times, stages = [], []
        for _ in range(2):
            t = time.perf_counter()
            report = audit_dataset(root, cache_dir=str(Path(tmp) / "cache"))
            times.append(time.perf_counter() - t)
            stages.append({k: round(v, 2) for k, v in report.seconds.items()})
        issues = report.label_issues()
        n = len(planted)
        res = {"images": len(report.paths), "cold_s": round(times[0], 1), "cached_s": round(times[1], 1),
               "stages_cold": stages[0], "stages_cached": stages[1],
               "planted": n, **report.counts()}
        if n:
            top = {r["path"] for r in issues[:n]}
            flagged = {r["path"] for r in issues}
            res.update(recall_at_n=round(len(top & planted) / n, 3),
                       flagged_precision=round(len(flagged & planted) / max(len(flagged), 1), 3),
                       flagged_recall=round(len(flagged & planted) / n, 3))
        print(json.dumps(res, indent=1))
        print(f"goal: cold <= {GOAL_COLD:.0f} s ({times[0]:.1f}), cached <= {GOAL_CACHED:.0f} s ({times[1]:.1f})")
        print("first label issues:", [(r["path"], r["given"], r["suggested"], r["confidence"],
                                       r["path"] in planted) for r in issues[:12]])
        print("near duplicates:", [(g["paths"], g["similarity"]) for g in report.near_duplicates()[:12]])
        print("outliers:", [(r["path"], r["score"]) for r in report.outliers()[:12]])
        if a.json:
            Path(a.json).write_text(json.dumps({**res, "label_issues": issues, "near_duplicates":
                                                report.near_duplicates(), "outliers": report.outliers()}, indent=1))


if __name__ == "__main__":
    main()
