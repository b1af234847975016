"""Benchmark 5: transfer learning against the from-scratch default.

For each dataset and backbone, runs the whole ``convlens train DATA --pretrained B`` command in a
fresh process, twice: ``cold`` with an empty cache folder (decode + features + head), then
``warm`` with the cache built (features read from disk). The wall time is the command's, start
to exit; the split (decode, features, head, fine-tune) is what the run records in its bundle.
``--scratch`` adds ``--pretrained none`` (the from-scratch default recipe) as the baseline, in
the same script. Validation accuracy is the report's. ``--nproc 1 2`` runs each setting with 1
and with 2 processes (``convlens train --nproc N``: the features shared out between them);
``finish s`` is the evaluation, report and bundle (from the ``linear head`` line, or the last
epoch's, to the exit), and with N processes decoding runs before they start, in the launcher
(``decode s`` is then that part of the wall time before the first process's first line).

    python benchmarks/transfer.py                                    # Lite0/1/2 on both datasets
    python benchmarks/transfer.py --backbones efficientnet_lite0 --datasets cats_and_dogs_filtered
    python benchmarks/transfer.py --backbones efficientnet_lite0 --finetune-epochs 2 --no-cold
    python benchmarks/transfer.py --backbones none                   # the from-scratch baseline only
    python benchmarks/transfer.py --backbones efficientnet_lite0 --datasets cats_and_dogs_filtered --nproc 1 2
"""

from __future__ import annotations

import argparse
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

DATASETS = ["cats_and_dogs_filtered", "cat_breeds5"]
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS, help="folders under ../shared/datasets (or paths)")
    p.add_argument("--backbones", nargs="+", default=BACKBONES, help="pretrained names, paths, or none")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after the head")
    p.add_argument("--no-cold", action="store_true", help="skip the cold run (the cache must exist)")
    p.add_argument("--cache-dir", default=None, help="cache folder kept between runs (default: a temporary one)")
    p.add_argument("--nproc", nargs="+", type=int, default=[1], help="process counts to run each setting with")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `convlens train` flags")
    return p.parse_args(argv)


def run_train(data: Path, backbone: str, cache: Path, project: Path, finetune: int, extra: list[str],
              nproc: int = 1) -> dict[str, Any]:
    """One `convlens train` in a fresh process: wall seconds, accuracy, the recorded split, and
    when its first line and its last training line (head or epoch) came."""
    cmd = [sys.executable, "-m", "convlens", "train", str(data), "--pretrained", backbone, "--cache-dir", str(cache),
           "--project", str(project), "--name", "run"]
    if finetune:
        cmd += ["--finetune-epochs", str(finetune)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    first = trained = None
    with subprocess.Popen(cmd + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            now = time.perf_counter() - t0
            first = now if first is None else first
            if line.startswith(("linear head", "epoch ")):
                trained = now
        stderr = proc.stderr.read()  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    run = sorted(project.glob("run*"), key=lambda p: p.stat().st_mtime)[-1]
    with zipfile.ZipFile(run / "model.convlens") as z:
        meta = json.loads(z.read("model.json"))
    m = meta["metrics"]
    split = dict(m.get("seconds", {}))
    if nproc > 1 and first is not None:  # decoded by the launcher, before the processes started
        split["decode"] = first
    split["finish"] = wall - trained if trained is not None else None
    return {"wall": wall, "acc": m.get("val_accuracy"), "split": split, "model": meta["arch"].get("name")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = Path(name) if Path(name).is_dir() else common.CATS_DOGS.parent / name
            for backbone, nproc in [(b, n) for b in args.backbones for n in args.nproc]:
                cache = Path(args.cache_dir or Path(tmp) / f"cache-{data.name}-{backbone}-{nproc}")
                runs = [("warm", False)] if args.no_cold else [("cold", True), ("warm", False)]
                for label, _ in runs:
                    r = run_train(data, backbone, cache, Path(tmp) / "runs", args.finetune_epochs, args.extra, nproc)
                    s = r["split"]
                    rows.append([name, backbone if backbone != "none" else f"none ({r['model']})", nproc, label,
                                 common.fmt(100 * r["acc"], 1) + "%", common.fmt(r["wall"]),
                                 *(common.fmt(s.get(k)) for k in ("decode", "features", "head", "finetune", "finish"))])
                    print(" | ".join(map(str, rows[-1])), flush=True)
                    if backbone == "none":
                        break  # from scratch: the cache matters little next to the training
    body = common.table(["dataset", "backbone", "processes", "cache", "val acc", "wall s", "decode s", "features s",
                         "head s", "fine-tune s", "finish s"], rows)
    print(common.report("Transfer learning", common.command_line(), body,
                        [f"fine-tune epochs: {args.finetune_epochs}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
