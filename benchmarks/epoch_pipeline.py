"""Benchmark 3: one full epoch with data loading, convlens against the tutorial's tf.data pipeline.

Both sides train the tutorial's recipe (tutorial_cnn, 300 px, batch 128, RandomFlip +
RandomRotation(0.1), RMSprop 1e-3) on ../shared/datasets/cats_and_dogs_filtered, and an epoch
is a training pass over train/ plus a validation pass over validation/, as ``fit`` with
``validation_data`` does.

* ``convlens``: ``convlens train --preset tutorial`` (the library call); the images are read
  from the decode-once cache, which is built before timing (its one-off cost is reported
  apart); an epoch's time is the run's own ``seconds`` column in metrics.csv.
* ``keras`` / ``keras-bf16``: the tutorial's pipeline, ``image_dataset_from_directory`` (JPEG
  decoding and resizing every epoch) + the augmentation ``map`` (AUTOTUNE) + ``prefetch``,
  ``model.fit(..., validation_data=...)``, in fp32 / mixed_bfloat16; an epoch's time comes from
  a callback.

Each contestant trains ``repeats + 1`` epochs in one process; the first (warm-up: tracing,
allocator, file cache) is reported separately and the figure is the median of the others.

    python benchmarks/epoch_pipeline.py
    python benchmarks/epoch_pipeline.py --repeats 1 --image-size 32 --data SMALL_DIR    # smoke run
    python benchmarks/epoch_pipeline.py --busy 1     # also with one core kept busy by another process
    python benchmarks/epoch_pipeline.py --busy 1 --preset default --only convlens   # convlens's default
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONTESTANTS = ["convlens", "keras", "keras-bf16"]
BASELINE = "keras"


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(common.CATS_DOGS),
                   help="dataset with train/ and validation/ class folders")
    p.add_argument("--image-size", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128, help="the tutorial's batch size")
    p.add_argument("--cache-dir", default=None, help="convlens cache folder (default: the user cache)")
    p.add_argument("--preset", default="tutorial",
                   help="convlens's preset; any other than tutorial trains at its own image and batch size")
    common.add_busy_argument(p)
    return p.parse_args(argv)


def convlens_worker(args: Any) -> dict[str, Any]:
    import csv
    import io

    from rich.console import Console

    from convlens.config import resolve_train_config
    from convlens.engine.trainer import prepare_data
    from convlens.engine.training import train

    quiet = Console(file=io.StringIO())
    with tempfile.TemporaryDirectory(prefix="convlens-bench-") as tmp:
        own = {"image_size": args.image_size, "batch_size": args.batch_size} if args.preset == "tutorial" else {}
        cfg = resolve_train_config(args.preset, None, {
            "data": args.data, **own, "epochs": args.repeats + 1, "threads": args.threads, "device": "cpu",
            "cache_dir": args.cache_dir, "project": tmp, "name": "epoch",
        })
        t = time.perf_counter()
        prepare_data(cfg, quiet)  # builds the cache on the first ever run
        prepare_seconds = time.perf_counter() - t
        result = train(cfg, console=quiet)
        with open(result.run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows]
    rates = [float(r["img_per_s"]) for r in rows[1:]]
    return {"first": seconds[0], "seconds": seconds[1:], "img_per_s": rates,
            "notes": f"{args.preset} preset, {cfg.image_size} px, batch {cfg.batch_size}: "
                     f"{rows[-1]['img_per_s'].split('.')[0]} img/s training; cache ready in {prepare_seconds:.1f} s "
                     "(a first-ever run decodes here, once)"}


def keras_worker(args: Any, precision: str) -> dict[str, Any]:
    tf = common.setup_tensorflow(common.threads_of(args), precision)
    import keras
    from keras import layers

    root = Path(args.data)
    size = (args.image_size, args.image_size)
    train_ds = keras.utils.image_dataset_from_directory(root / "train", image_size=size, batch_size=args.batch_size,
                                                        seed=1337, label_mode="binary", verbose=False)
    val_ds = keras.utils.image_dataset_from_directory(root / "validation", image_size=size,
                                                      batch_size=args.batch_size, label_mode="binary",
                                                      shuffle=False, verbose=False)
    augmentation = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)])
    train_ds = train_ds.map(lambda img, label: (augmentation(img), label), num_parallel_calls=tf.data.AUTOTUNE)
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
    val_ds = val_ds.prefetch(tf.data.AUTOTUNE)
    model = common.keras_tutorial_model(args.image_size)
    model.compile(loss="binary_crossentropy", metrics=["accuracy"], optimizer=keras.optimizers.RMSprop(1e-3))

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(time.perf_counter() - self._t)

    timer = EpochTimer()
    model.fit(train_ds, epochs=args.repeats + 1, validation_data=val_ds, callbacks=[timer], verbose=0)
    return {"first": timer.seconds[0], "seconds": timer.seconds[1:],
            "notes": f"{'mixed_bfloat16' if precision == 'bf16' else 'fp32'}, decodes the images every epoch"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "convlens":
            common.emit(convlens_worker(args))
        else:
            common.emit(keras_worker(args, "bf16" if args.worker == "keras-bf16" else "fp32"))
        return 0
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "validation").is_dir():
        print(f"error: --data must hold train/ and validation/ class folders. Received: data={str(data)!r}",
              file=sys.stderr)
        return 2
    names = args.only or CONTESTANTS
    forwarded = common.worker_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if name.startswith("keras") and not common.have("tensorflow"):
            results[name] = {"error": "TensorFlow is not installed: pip install -e '.[bench]'"}
        else:
            results[name] = common.run_idle_and_busy(__file__, name, forwarded, args.busy)
    med = {n: common.median(r["seconds"]) for n, r in results.items() if r.get("seconds")}
    busy = {n: common.median(r["busy"]["seconds"]) for n, r in results.items() if r.get("busy", {}).get("seconds")}
    rows = []
    for name in names:
        r = results[name]
        if "error" in r or name not in med:
            rows.append([name, "-", "-", "-", *(["-", "-"] if args.busy else []), r.get("error", "no timed epoch")])
            continue
        row = [name, common.fmt(med[name], 2), common.fmt(r["first"], 2),
               f"{med[BASELINE] / med[name]:.2f}x" if BASELINE in med else "-"]
        if args.busy:
            b = busy.get(name)
            row += [common.fmt(b, 2), f"{100 * med[name] / b:.0f}%" if b else r.get("busy", {}).get("error", "-")]
            if b and r["busy"].get("img_per_s"):
                r["notes"] += f"; busy: {common.median(r['busy']['img_per_s']):.0f} img/s training"
        rows.append([*row, r["notes"]])
    headers = ["contestant", "epoch seconds (median)", "first epoch s", "speed-up vs tutorial pipeline"]
    if args.busy:
        headers += [f"epoch s, {args.busy} core(s) busy", "kept (idle s / busy s)"]
    body = common.table([*headers, "notes"], rows)
    notes = [f"{data}, {args.image_size} px, batch {args.batch_size}; an epoch = training pass + validation pass; "
             f"median of {args.repeats} epochs after a warm-up epoch"]
    if "convlens" in med and BASELINE in med:
        ratio = med[BASELINE] / med["convlens"]
        notes.append(f"goal: a convlens epoch >= 2x faster than the tutorial's fp32 pipeline: {ratio:.2f}x -> "
                     f"{'met' if ratio >= 2 else 'NOT met'}")
    keras_busy = [v for n, v in busy.items() if n.startswith("keras")]
    if "convlens" in busy:
        kept = med["convlens"] / busy["convlens"]
        notes.append(f"goal with {args.busy} busy core(s): convlens keeps >= 45% of its idle throughput: "
                     f"{100 * kept:.0f}% -> {'met' if kept >= 0.45 else 'NOT met'}"
                     + (f"; {min(keras_busy) / busy['convlens']:.2f}x faster than the fastest Keras pipeline "
                        "under the same load" if keras_busy else ""))
    print(common.report("One full epoch including data loading (benchmark 3)", common.command_line(), body, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
