"""Benchmark 4: wall time until validation accuracy first reaches 80%, 85% and 90%.

Runs ``convlens train`` (the library call) on ../shared/datasets/cats_and_dogs_filtered for the
default preset and for ``--preset tutorial``, once per seed (``--repeats`` seeds, each in a fresh
process). Validation accuracy is measured at the end of every epoch, so a threshold's time is
the sum of the epoch times (training + validation, from the run's metrics.csv) up to the first
epoch that reaches it; the one-off data preparation (cache) is excluded and reported apart.
A threshold a run never reaches counts as infinitely slow in the median, and the table says
how many runs reached it.

This one is long (a full training per preset and seed): the defaults take hours on 2 cores.

    python benchmarks/time_to_accuracy.py
    python benchmarks/time_to_accuracy.py --repeats 1 --epochs 1 --image-size 32 --data SMALL_DIR  # smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PRESETS = ["default", "tutorial"]


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(common.CATS_DOGS), help="dataset folder")
    p.add_argument("--presets", nargs="+", default=PRESETS, help="presets to time")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.80, 0.85, 0.90])
    p.add_argument("--seed", type=int, default=1337, help="first seed; repeat i uses seed + i")
    p.add_argument("--epochs", type=int, default=None, help="override the presets' epochs")
    p.add_argument("--image-size", type=int, default=None, help="override the presets' image size")
    p.add_argument("--cache-dir", default=None, help="convlens cache folder (default: the user cache)")
    p.add_argument("--config", default=None, help="YAML file of configuration keys applied on top of each preset")
    p.add_argument("--run-seed", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: Any, preset: str) -> dict[str, Any]:
    import csv
    import io

    from rich.console import Console

    from convlens.config import resolve_train_config
    from convlens.engine.trainer import prepare_data
    from convlens.engine.training import train

    overrides: dict[str, Any] = {"data": args.data, "seed": args.run_seed, "device": "cpu",
                                 "threads": common.threads_of(args), "cache_dir": args.cache_dir}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.image_size:
        overrides["image_size"] = args.image_size
    quiet = Console(file=io.StringIO())
    with tempfile.TemporaryDirectory(prefix="convlens-bench-") as tmp:
        cfg = resolve_train_config(preset, args.config, {**overrides, "project": tmp, "preset": preset})
        t = time.perf_counter()
        prepare_data(cfg, quiet)
        prepare_seconds = time.perf_counter() - t
        t = time.perf_counter()
        result = train(cfg, console=quiet)
        total = time.perf_counter() - t
        with open(result.run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    elapsed, curve = 0.0, []
    for r in rows:
        elapsed += float(r["seconds"])
        curve.append((elapsed, float(r["val_acc"]) if r["val_acc"] else 0.0))
    reached = {str(th): next((s for s, acc in curve if acc >= th), None) for th in args.thresholds}
    return {"reached": reached, "best": max(acc for _, acc in curve), "epochs": len(rows),
            "final": result.metrics.get("val_accuracy"),
            "epoch_seconds": elapsed, "last_val": curve[-1][1],
            "prepare": prepare_seconds, "total": total,
            "config": f"{cfg.model}, {cfg.image_size} px, batch {cfg.batch_size}, {cfg.optimizer}, {cfg.epochs} epochs"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.emit(worker(args, args.worker))
        return 0
    forwarded = common.worker_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    for preset in args.presets:
        runs[preset] = []
        for i in range(args.repeats):
            r = common.run_worker(__file__, preset, [*forwarded, "--run-seed", str(args.seed + i)])
            runs[preset].append(r)
    headers = ["preset", "configuration"] + [f"to {th:.0%} (s, median)" for th in args.thresholds] + \
        ["best val acc (median)", "final evaluation acc (median)", "full run s (median)"]
    rows = []
    for preset, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append([preset, rs[0].get("error", "?")] + ["-"] * (len(headers) - 2))
            continue
        cells = [preset, ok[0]["config"]]
        for th in args.thresholds:
            times = [r["reached"][str(th)] for r in ok]
            hit = [t for t in times if t is not None]
            med = common.median([t if t is not None else math.inf for t in times])
            cells.append(f"{common.fmt(med) if math.isfinite(med) else 'not reached'} ({len(hit)}/{len(ok)} runs)")
        finals = [r["final"] for r in ok if r.get("final") is not None]
        cells += [f"{common.median([r['best'] for r in ok]):.3f}",
                  f"{common.median(finals):.3f}" if finals else "-",
                  common.fmt(common.median([r["total"] for r in ok]))]
        rows.append(cells)
    body = common.table(headers, rows)
    notes = [f"{args.data}; {args.repeats} runs per preset (seeds {args.seed}..{args.seed + args.repeats - 1}); "
             "times are summed epoch times (training + validation) up to the first epoch at the threshold; "
             "'full run' also includes the final evaluation, report and bundle; 'final evaluation' is the "
             "report's accuracy (flip-averaged when the recipe says so), what `convlens predict` gives"]
    print(common.report("Time to accuracy (benchmark 4)", common.command_line(), body, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
