"""Benchmark 1: training throughput of the tutorial's CNN, convlens against Keras 3 / TensorFlow.

Both sides train the same architecture (Conv 16/32/64/128 3x3 same + ReLU + MaxPool 2, GAP,
Dense(1), binary cross-entropy, RMSprop 1e-3) on the same in-memory batches of random uint8
images (seeded: identical bytes on both sides). convlens runs its own training step
(``convlens.engine.factory.StepFunction``: uint8 batch -> [augmentation] -> model input ->
autocast forward -> loss, then backward and the optimiser step, exactly as ``convlens train``'s
loop); Keras runs ``model.train_on_batch`` on float32 tensors (what ``image_dataset_from_directory``
yields). ``--augment`` adds the tutorial's RandomFlip + RandomRotation(0.1) on both sides.

    python benchmarks/train_speed.py                  # 300 px, batch 32, 10 steps x 5 repeats
    python benchmarks/train_speed.py --repeats 1 --image-size 64 --steps 2   # smoke run
    python benchmarks/train_speed.py --busy 1   # also with one core kept busy by another process
    python benchmarks/train_speed.py --kernels  # also oneDNN kernel time per step (ONEDNN_VERBOSE)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONTESTANTS = {
    # name: (framework, precision)
    "convlens": ("torch", "auto"),
    "convlens-fp32": ("torch", "fp32"),
    "keras-fp32": ("keras", "fp32"),
    "keras-bf16": ("keras", "bf16"),
}


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="tutorial_cnn", choices=["tutorial_cnn", "resnet8", "vgg10"],
                   help="tutorial_cnn (the tutorial preset), vgg10 (the from-scratch default) or resnet8 (the "
                        "earlier default); the same network in Keras")
    p.add_argument("--image-size", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (tracing, allocator)")
    p.add_argument("--augment", action="store_true", help="add RandomFlip + RandomRotation(0.1) on both sides")
    p.add_argument("--profile", metavar="TRACE.json", default=None,
                   help="convlens workers: also write a torch.profiler Chrome trace and print the top ops")
    p.add_argument("--kernels", action="store_true",
                   help="run the workers with ONEDNN_VERBOSE=1 and add a table of oneDNN kernel time per step "
                        "(convolutions, pooling, ...) against the wall time: both frameworks run the same "
                        "library, so this shows which kernels each spends its step in")
    common.add_busy_argument(p)
    return p.parse_args(argv)


def _batches(args: Any) -> list[tuple[Any, Any]]:
    n = args.batch_size * max(args.steps, args.warmup_steps)
    x, y = common.random_batch(n, args.image_size, seed=0)
    b = args.batch_size
    return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(n // b)]


def torch_worker(args: Any, precision: str) -> dict[str, Any]:
    """convlens's own training step (the body of ``convlens train``'s loop)."""
    from convlens import runtime

    allocator = runtime.tune_allocator()
    threads = runtime.configure_threads(common.threads_of(args))
    governor = runtime.ThreadGovernor(threads, adaptive=args.threads <= 0)  # as `convlens train`
    import torch

    from convlens.config import resolve_train_config
    from convlens.data.preprocess import Preprocessing
    from convlens.engine.factory import StepFunction, correct_count, make_model
    from convlens.engine.optim import build_optimizer

    preset = "tutorial" if args.model == "tutorial_cnn" else "default"
    cfg = resolve_train_config(preset, None, {
        "image_size": args.image_size, "batch_size": args.batch_size, "device": "cpu", "precision": precision,
        "flip": bool(args.augment), "rotation": 0.1 if args.augment else 0.0, "threads": threads,
        "crop_scale": 1.0, "crop_margin": 0.0, "model": args.model,
        **({"optimizer": "adamw", "lr": 5e-3} if args.model == "resnet8" else {}),  # as its Keras twin
    })
    dev = runtime.resolve_device(cfg.device, cfg.precision)
    torch.manual_seed(0)
    model = make_model(cfg.model, 2, 3, cfg.image_size, cfg.model_args).to(dev.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    prep = Preprocessing(size=(cfg.image_size, cfg.image_size), channels=3, scale=cfg.scale,
                         mean=tuple(cfg.mean), std=tuple(cfg.std))
    step_fn = StepFunction(model, cfg, prep, dev, 2, None)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    aug_gen = torch.Generator().manual_seed(0)
    batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in _batches(args)]

    def steps(count: int) -> None:
        for x, y in batches[:count]:
            governor.update()
            loss, logits = step_fn(x, y, aug_gen, None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # the loop reads the loss and the accuracy every step
            correct_count(logits.detach().float(), y)

    steps(args.warmup_steps)
    seconds = [common.timed(lambda: steps(args.steps)) for _ in range(args.repeats)]
    if args.profile:
        _profile(lambda: steps(min(args.steps, 3)), args.profile)
    precision_used = str(dev.amp_dtype).replace("torch.", "") if dev.amp_dtype else "fp32"
    return {"seconds": seconds, "images": args.steps * args.batch_size, "precision": precision_used,
            "steps_run": args.warmup_steps + args.repeats * args.steps + (min(args.steps, 3) if args.profile else 0),
            "notes": f"channels_last={cfg.channels_last}, allocator tuned={allocator}, "
                     f"{threads} threads (at the end: {governor.threads})"}


def _profile(fn: Any, path: str) -> None:
    """torch.profiler over ``fn``: a Chrome trace and the top operators by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    prof.export_chrome_trace(path)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


def keras_worker(args: Any, precision: str) -> dict[str, Any]:
    """Keras 3 on TensorFlow: ``train_on_batch`` on the same batches as float32 tensors."""
    import numpy as np

    tf = common.setup_tensorflow(common.threads_of(args), precision)
    import keras

    if args.model == "resnet8":  # the earlier default recipe: AdamW, weight decay 5e-4
        model = common.keras_resnet8(args.image_size)
        optimizer: Any = keras.optimizers.AdamW(5e-3, weight_decay=5e-4)
    elif args.model == "vgg10":  # the from-scratch default: SGD Nesterov momentum 0.9, weight decay 5e-4
        model = common.keras_vgg10(args.image_size)
        optimizer = keras.optimizers.SGD(0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        model = common.keras_tutorial_model(args.image_size, augment=args.augment)
        optimizer = keras.optimizers.RMSprop(1e-3)
    model.compile(loss="binary_crossentropy", optimizer=optimizer, metrics=["accuracy"])
    batches = [(tf.constant(x.astype(np.float32)), tf.constant(y.astype(np.float32)[:, None]))
               for x, y in _batches(args)]

    def steps(count: int) -> None:
        for x, y in batches[:count]:
            model.train_on_batch(x, y)

    steps(args.warmup_steps)
    seconds = [common.timed(lambda: steps(args.steps)) for _ in range(args.repeats)]
    return {"seconds": seconds, "images": args.steps * args.batch_size,
            "steps_run": args.warmup_steps + args.repeats * args.steps,
            "precision": "mixed_bfloat16" if precision == "bf16" else "fp32",
            "notes": f"jit_compile={getattr(model, 'jit_compile', '?')}, {common.threads_of(args)} threads"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        framework, precision = CONTESTANTS[args.worker]
        worker = torch_worker if framework == "torch" else keras_worker
        common.emit(worker(args, precision))
        return 0
    forwarded = common.worker_args(argv)
    names = args.only or list(CONTESTANTS)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if CONTESTANTS[name][0] == "keras" and not common.have("tensorflow"):
            results[name] = {"error": "TensorFlow is not installed: pip install -e '.[bench]'"}
            continue
        results[name] = common.run_idle_and_busy(__file__, name, forwarded, args.busy,
                                                 env={"ONEDNN_VERBOSE": "1"} if args.kernels else None)
    rate = {n: r["images"] / common.median(r["seconds"]) for n, r in results.items() if "seconds" in r}
    busy = {n: r["busy"]["images"] / common.median(r["busy"]["seconds"]) for n, r in results.items()
            if "seconds" in r.get("busy", {})}
    keras_rates = [v for n, v in rate.items() if n.startswith("keras")]
    best_keras = max(keras_rates) if keras_rates else None
    rows = []
    for name in names:
        r = results[name]
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "-", *(["-", "-"] if args.busy else []), r["error"]])
            continue
        per = [r["images"] / s for s in r["seconds"]]
        row = [name, r["precision"], common.fmt(rate[name]), f"{common.fmt(min(per))}-{common.fmt(max(per))}",
               f"{rate[name] / rate['keras-fp32']:.2f}x" if "keras-fp32" in rate else "-",
               f"{rate[name] / best_keras:.2f}x" if best_keras else "-"]
        if args.busy:
            b = busy.get(name)
            row += [common.fmt(b), f"{100 * b / rate[name]:.0f}%" if b else r.get("busy", {}).get("error", "-")]
        rows.append([*row, r["notes"]])
    headers = ["contestant", "precision", "img/s (median)", "range", "vs Keras fp32", "vs best Keras"]
    if args.busy:
        headers += [f"img/s, {args.busy} core(s) busy", "kept"]
    body = common.table([*headers, "notes"], rows)
    notes = [f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.steps} steps per repeat, "
             f"median of {args.repeats} repeats after {args.warmup_steps} warm-up steps; "
             f"augmentation: {'RandomFlip + RandomRotation(0.1)' if args.augment else 'none'}"]
    if "convlens" in rate and best_keras:
        ratio = rate["convlens"] / best_keras
        notes.append(f"goal: convlens >= 1.3x the best Keras configuration: {ratio:.2f}x -> "
                     f"{'met' if ratio >= 1.3 else 'NOT met'}")
    keras_busy = [v for n, v in busy.items() if n.startswith("keras")]
    if "convlens" in busy and keras_busy:
        notes.append(f"with {args.busy} busy core(s): convlens {busy['convlens']:.1f} img/s, best Keras "
                     f"{max(keras_busy):.1f} img/s ({busy['convlens'] / max(keras_busy):.2f}x); convlens keeps "
                     f"{100 * busy['convlens'] / rate['convlens']:.0f}% of its idle throughput")
    if args.kernels:
        body += "\n\n" + kernel_table(results, args.steps)
        notes.append("kernel table: oneDNN's own execution times (ONEDNN_VERBOSE) summed over every step the "
                     "worker ran, warm-up included, divided by that count; a sum above the wall time means "
                     "the framework ran kernels concurrently (TensorFlow's inter-op threads)")
    print(common.report("Training throughput (benchmark 1)", common.command_line(), body, notes))
    return 0


KERNEL_COLUMNS = ("convolution/forward_training", "convolution/backward_data", "convolution/backward_weights",
                  "pooling/forward_training", "pooling/backward_data")


def kernel_table(results: dict[str, dict[str, Any]], steps: int) -> str:
    """Milliseconds per step in oneDNN kernels, by kind, beside each contestant's wall time per step."""
    rows = []
    for name, r in results.items():
        times = r.get("onednn_ms")
        if times is None or not r.get("steps_run"):
            continue
        per_step = {k: v / r["steps_run"] for k, v in times.items()}
        wall = 1000 * common.median(r["seconds"]) / steps
        rest = sum(v for k, v in per_step.items() if k not in KERNEL_COLUMNS)
        total = sum(per_step.values())
        rows.append([name, common.fmt(wall), *(common.fmt(per_step.get(k, 0.0)) for k in KERNEL_COLUMNS),
                     common.fmt(rest), common.fmt(total), f"{total / wall:.2f}"])
    headers = ["contestant", "wall ms/step", "conv fwd", "conv bwd data", "conv bwd weights", "pool fwd",
               "pool bwd", "other oneDNN", "oneDNN total", "oneDNN / wall"]
    return common.table(headers, rows)


if __name__ == "__main__":
    raise SystemExit(main())
