"""Benchmark 11: fine-tuning recipes for a pretrained backbone (issue 24, point 4).

For each dataset and recipe, runs the whole ``convlens train DATA --finetune-epochs N`` command
in a fresh process with one cache folder for all runs (decoded images and features are then
read from disk, so repeats cost the fine-tuning itself) and reads the bundle: the report's
validation accuracy, and from ``metrics.csv`` the head-only epoch's and each fine-tuning
epoch's validation accuracy, the best epoch and the fine-tuning img/s; wall is the command's.
A recipe is a list of ``convlens train`` flags; every ``--finetune-*`` key is given, so a
recipe means the same whatever the defaults are.

    python benchmarks/finetune_recipes.py --cache-dir /tmp/ft/cache
    python benchmarks/finetune_recipes.py --datasets cat_breeds5 --recipes today layerwise --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DATASETS = ["cat_breeds5", "imagenette8", "cats_and_dogs_filtered"]
BASE = {"units": 0.25, "lr": 1e-4, "lr-decay": 1.0, "bn": "frozen", "warmup": 0.0, "patience": 0, "crop-scale": 1.0}
# Each recipe changes one thing from the one before it where it can (docs/benchmarks.md).
RECIPES: dict[str, dict[str, Any]] = {
    "today": {},  # the last quarter of the units at one rate, BN frozen, no crops, no warm-up
    "layerwise": {"units": 0.5, "lr-decay": 0.8},  # half the units, each 0.8x the rate of the next
    "layerwise_3e-4": {"units": 0.5, "lr-decay": 0.8, "lr": 3e-4},
    "layerwise_bn": {"units": 0.5, "lr-decay": 0.8, "bn": "train"},
    "layerwise_crop": {"units": 0.5, "lr-decay": 0.8, "crop-scale": 0.5},
    "layerwise_warmup": {"units": 0.5, "lr-decay": 0.8, "warmup": 0.3, "patience": 1},  # the default recipe now
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS, help="folders under ../shared/datasets (or paths)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--epochs", type=int, default=3, help="--finetune-epochs of every run")
    p.add_argument("--cache-dir", default=None, help="cache folder kept between runs (default: a temporary one)")
    p.add_argument("--project", default=None, help="where the run folders go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def recipe_flags(name: str) -> list[str]:
    """The ``--finetune-*`` flags of recipe ``name`` (every key given)."""
    flags: list[str] = []
    for key, value in {**BASE, **RECIPES[name]}.items():
        flags += [f"--finetune-{key}", str(value)]
    return flags


def run_recipe(data: Path, name: str, epochs: int, cache: Path, project: Path) -> dict[str, Any]:
    """One ``convlens train`` in a fresh process; the report's accuracy and the epochs' rows."""
    cmd = [sys.executable, "-m", "convlens", "train", str(data), "--finetune-epochs", str(epochs),
           "--cache-dir", str(cache), "--project", str(project), "--name", f"{data.name}-{name}",
           *recipe_flags(name)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    run = sorted(project.glob(f"{data.name}-{name}*"), key=lambda p: p.stat().st_mtime)[-1]
    with zipfile.ZipFile(run / "model.convlens") as z:
        meta = json.loads(z.read("model.json"))
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_acc"]) for r in rows if r.get("val_acc")]
    loss = [float(r["val_loss"]) for r in rows if r.get("val_acc")]
    tuned = rows[1:]
    # The trainer's rule (run_folder.is_better): the highest accuracy, then the lowest loss.
    best = max(range(len(val)), key=lambda i: (val[i], -loss[i])) + 1 if val else None
    return {"dataset": data.name, "recipe": name, "report_acc": meta["metrics"].get("val_accuracy"),
            "head_acc": val[0] if val else None, "epochs_acc": val[1:], "best_epoch": best,
            "epochs_run": len(tuned), "img_per_s": common.median([float(r["img_per_s"]) for r in tuned]) if tuned else None,
            "wall": wall}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: list[dict[str, Any]] = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir or Path(tmp) / "cache")
        project = Path(args.project or Path(tmp) / "runs")
        for name in args.datasets:
            data = Path(name) if Path(name).is_dir() else common.CATS_DOGS.parent / name
            for recipe in args.recipes:
                r = run_recipe(data, recipe, args.epochs, cache, project)
                out.append(r)
                rows.append([r["dataset"], recipe, common.fmt(100 * r["head_acc"], 2) + "%",
                             " / ".join(common.fmt(100 * a, 2) for a in r["epochs_acc"]),
                             r["best_epoch"], common.fmt(100 * r["report_acc"], 2) + "%",
                             common.fmt(r["img_per_s"], 0), common.fmt(r["wall"], 0)])
                print(" | ".join(map(str, rows[-1])), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    body = common.table(["dataset", "recipe", "head val acc", "fine-tuning epochs val acc", "best epoch",
                         "report acc", "fine-tuning img/s", "wall s"], rows)
    print(common.report("Fine-tuning recipes", common.command_line(), body,
                        [f"--finetune-epochs {args.epochs}"] + [f"{k}: {' '.join(recipe_flags(k))}" for k in args.recipes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
