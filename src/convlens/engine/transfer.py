"""Transfer learning: a pretrained backbone, frozen features, a fitted linear head, optional fine-tuning.

The fast path of ``convlens train DIR --pretrained NAME|PATH``:

1. decode once into the cache at the backbone's own preprocessing (size, crop, interpolation,
   scaling: all stored in the bundle);
2. extract frozen features once (:mod:`convlens.engine.features`, cached on disk by file hash):
   in bf16 (the validation features only score the head on the way; the report evaluates the
   whole model through the inference path ``predict`` uses);
3. fit the dense head (GAP -> dense, so the exact CAM works) by full-batch L-BFGS on the
   features, with the run's class weights and label smoothing, and write it into the model;
4. optionally fine-tune the last blocks for ``finetune_epochs`` (bf16, channels_last, a lower
   learning rate, batch-norm statistics frozen);
5. the usual evaluation, report and bundle (:func:`convlens.engine.run_folder.finish_run`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from rich.console import Console

from convlens import runtime
from convlens.config import PRESETS, TrainConfig, auto_backbone, dump_yaml, read_config_file
from convlens.data.decode import decode
from convlens.data.scan import scan
from convlens.data.split import write_split_csv
from convlens.engine import tensorboard
from convlens.engine.factory import (
    StepFunction,
    class_weights,
    classification_loss,
    correct_count,
    soft_targets,
)
from convlens.engine.features import Backbone, cached_features, load_pretrained, subset_hashes
from convlens.engine.optim import build_optimizer, build_scheduler
from convlens.engine.run_folder import RunResult, finish_run, make_run_dir, say, write_metrics_csv
from convlens.engine.trainer import _validate, command_config, prepare_data
from convlens.engine.trainer import train as train_from_scratch
from convlens.engine.trainer import train_command as train_from_scratch_command
from convlens.errors import ConfigError, ImageError
from convlens.files import write_text
from convlens.models.pretrained import load_backbone

HEAD_L2 = 1.0  # L2 on the standardised head weights: best or tied on both datasets (docs/benchmarks.md)
HEAD_MAX_ITER = 100
FINETUNE_LR = 1e-4  # AdamW, cosine: ~1/50 of a from-scratch learning rate
SAMPLE_IMAGES = 24  # images decoded to decide whether a dataset is photos


# ----------------------------------------------------------------------------- choice
def resolve_pretrained(cfg: TrainConfig, model_chosen: bool) -> TrainConfig:
    """Replace ``pretrained: auto`` by a backbone name or ``none`` (the rule: :func:`config.auto_backbone`).

    Whether the images are photos is judged on up to :data:`SAMPLE_IMAGES` really decoded files.
    """
    if cfg.pretrained != "auto":
        return cfg
    if cfg.data is None or cfg.preset != "default" or model_chosen or cfg.nproc > 1:
        return replace(cfg, pretrained="none")  # --nproc N asks for (distributed) training from scratch
    entries = scan(cfg.data).entries
    sample = entries[:: max(1, len(entries) // SAMPLE_IMAGES)][:SAMPLE_IMAGES]
    sides, gray = [], []
    for e in sample:
        try:
            img, info = decode(e.path, max_pixels=cfg.max_pixels, min_side=1, keep_gray=True)
        except ImageError:
            continue  # reported by the check later
        sides.append(min(img.size))
        gray.append(info.grayscale)
    median = float(np.median(sides)) if sides else 0.0
    choice = auto_backbone(True, cfg.preset, model_chosen, bool(gray) and all(gray), median)
    return replace(cfg, pretrained=choice)


# ----------------------------------------------------------------------------- linear head
def fit_linear_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                    weights: torch.Tensor | None = None, label_smoothing: float = 0.0, l2: float = HEAD_L2,
                    max_iter: int = HEAD_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense layer ``(weight (out_units, C), bias)`` fitted by full-batch L-BFGS on features.

    Minimises the training loss (:func:`classification_loss`: one sigmoid unit for two classes,
    softmax otherwise) plus ``l2 * |W|^2 / 2`` on standardised features; the standardisation is
    folded back into the returned weights, so ``features @ weight.T + bias`` are the logits.
    """
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    targets = soft_targets(torch.from_numpy(np.asarray(labels, dtype=np.int64)), num_classes)
    out_units = 1 if num_classes == 2 else num_classes
    w = torch.zeros(out_units, x.shape[1], requires_grad=True)
    b = torch.zeros(out_units, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = classification_loss(z @ w.T + b, targets, weights, label_smoothing) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / sd
        return weight, b - weight @ mu


# ----------------------------------------------------------------------------- fine-tuning
def trainable_units(model: Any) -> list[torch.nn.Module]:
    """The last quarter of a model's units (at least the head and one block): what fine-tuning updates."""
    units = model.summary_units()
    return [m for _, _, m in units[-max(2, len(units) // 4):]]


def finetune(model: Any, cfg: TrainConfig, prepared: Any, dev: runtime.DeviceInfo, console: Console,
             weights: torch.Tensor | None) -> list[dict[str, Any]]:
    """Fine-tune the last units for ``cfg.finetune_epochs``; batch norm keeps its statistics."""
    from convlens.data.loader import BatchLoader

    for p in model.parameters():
        p.requires_grad_(False)
    for unit in trainable_units(model):
        for p in unit.parameters():
            p.requires_grad_(True)
    model = model.to(dev.device, memory_format=torch.channels_last)
    step = StepFunction(model, cfg, prepared.preprocessing, dev, len(prepared.classes), weights)
    loader = BatchLoader(prepared.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         drop_last=len(prepared.train) % cfg.batch_size == 1)
    val_loader = BatchLoader(prepared.val, cfg.batch_size, shuffle=False, even=False) if len(prepared.val) else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(torch.nn.ParameterList(params), "adamw", FINETUNE_LR, cfg.weight_decay)
    sched = build_scheduler(opt, "cosine", cfg.finetune_epochs, len(loader), 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(cfg.finetune_epochs):
        loader.set_epoch(epoch)
        model.eval()  # frozen batch-norm statistics: small batches of a new dataset would spoil them
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for x, y in loader:
            loss, logits = step(x, y, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, correct, seen = loss_sum + float(loss.detach()) * len(y), correct + correct_count(logits.detach().float(), y), seen + len(y)
        seconds = time.perf_counter() - t0
        val_loss, val_acc = _validate(model, val_loader, prepared.preprocessing, dev, True, len(prepared.classes))
        row = {"epoch": epoch + 2, "lr": FINETUNE_LR, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_loss": val_loss, "val_acc": val_acc, "img_per_s": seen / seconds, "seconds": seconds}
        history.append(row)
        say(console, f"fine-tune {epoch + 1}/{cfg.finetune_epochs}  loss {row['train_loss']:.4f}  "
                     f"val_acc {val_acc if val_acc is None else f'{val_acc:.4f}'}  {row['img_per_s']:.0f} img/s  {seconds:.1f}s")
    for p in model.parameters():
        p.requires_grad_(True)
    return history


# ----------------------------------------------------------------------------- the run
def _subset_features(backbone: Backbone, prepared: Any, subset: Any, cfg: TrainConfig, precision: str,
                     flip: bool = False) -> np.ndarray:
    return cached_features(backbone, subset.images, subset_hashes(prepared, subset.paths), prepared.root,
                           prep=prepared.preprocessing, cache_dir=cfg.cache_dir, precision=precision, flip=flip)


def train_transfer(cfg: TrainConfig, console: Console | None = None) -> RunResult:
    """``convlens train`` with ``cfg.pretrained`` a backbone name or weight file (see the module doc)."""
    console = console or Console()
    if cfg.tensorboard:
        tensorboard.require()  # before minutes of decoding
    t = {"start": time.perf_counter()}
    runtime.tune_allocator()
    threads = runtime.configure_threads(cfg.threads or None)
    dev = runtime.resolve_device(cfg.device, cfg.precision)
    backbone = load_pretrained(cfg.pretrained, 2, cfg.arch, cfg.max_pixels)
    p = backbone.preprocessing
    cfg = replace(cfg, arch=backbone.source.arch, model=backbone.source.arch, image_size=p.size[0], resize=p.resize,
                  scale=p.scale, mean=list(p.mean), std=list(p.std), channels=3,
                  crop_margin=0.0, flip_average=False,  # the from-scratch recipe's crop and flip averaging
                  epochs=1 + cfg.finetune_epochs)  # what runs: the head fit, then any fine-tuning epochs
    where = "ImageNet weights from the installed package" if backbone.source.packaged else backbone.source.path
    say(console, f"backbone: {backbone.source.arch} ({where}); {p.size[0]}x{p.size[1]} {p.interpolation} "
                  f"centre crop, {threads} threads" + ("; --pretrained none trains from scratch" if backbone.source.packaged else ""))
    cfg, prepared = prepare_data(cfg, console, pixels={"interpolation": p.interpolation, "crop_fraction": p.crop_fraction})
    records = [prepared.cache.records[q] for q in prepared.train.paths[:2000]]
    if records and all(r.grayscale for r in records):
        say(console, "note: grayscale images: the channel is replicated 3x for the RGB backbone")
    t["decode"] = time.perf_counter()
    num_classes = len(prepared.classes)
    model, _ = load_backbone(backbone.source.path, num_classes, backbone.source.arch)
    backbone = replace(backbone, model=model.eval())
    run_dir = make_run_dir(cfg.project, cfg.name, cfg.exist_ok)
    write_text(run_dir / "config.yaml", dump_yaml(cfg))
    write_split_csv(run_dir / "split.csv", prepared.split_rows)
    say(console, f"run folder: {run_dir}")

    train_x = _subset_features(backbone, prepared, prepared.train, cfg, "bf16")
    train_y = prepared.train.labels
    if cfg.head_flip:
        train_x = np.concatenate([train_x, _subset_features(backbone, prepared, prepared.train, cfg, "bf16", True)])
        train_y = np.concatenate([train_y, train_y])
    has_val = len(prepared.val) > 0
    val_x = _subset_features(backbone, prepared, prepared.val, cfg, "bf16") if has_val else None
    t["features"] = time.perf_counter()
    weights = class_weights(prepared.train.labels, num_classes, cfg.class_weights)
    w, b = fit_linear_head(train_x, train_y, num_classes, weights=weights, label_smoothing=cfg.label_smoothing)
    fc = model.gap_linear_head()
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)
    t["head"] = time.perf_counter()
    history = [_head_row(model, train_x, train_y, val_x, prepared, t["head"] - t["features"])]
    say(console, f"linear head on {len(train_y)} feature rows: train_acc {history[0]['train_acc']:.4f}"
                 + (f"  val_acc {history[0]['val_acc']:.4f}" if has_val else "") + f"  {t['head'] - t['features']:.1f}s")
    if cfg.finetune_epochs:
        history += finetune(model, cfg, prepared, dev, console, weights)
    t["finetune"] = time.perf_counter()
    write_metrics_csv(run_dir / "metrics.csv", history)  # what `convlens runs` and `compare` read
    if cfg.tensorboard:
        tensorboard.write_history(run_dir, history)
    best = {"epoch": len(history)}
    timing = {"decode": t["decode"] - t["start"], "features": t["features"] - t["decode"],
              "head": t["head"] - t["features"], "finetune": t["finetune"] - t["head"]}
    from convlens.evaluate.plots import curves_png

    curves = curves_png(history)
    model = model.to(memory_format=torch.contiguous_format).eval()
    result = finish_run(model, cfg, prepared, run_dir, history, best, dev.device, curves, console,
                        extra={"pretrained": backbone.source.to_dict(), "seconds": timing})
    return result


def _logits(model: Any, features: np.ndarray) -> np.ndarray:
    """The model's logits from pooled features: its dense layer, in fp32."""
    with torch.no_grad():
        return model.gap_linear_head()(torch.from_numpy(features)).numpy()


def _head_row(model: Any, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None, prepared: Any,
              seconds: float) -> dict[str, Any]:
    n = len(prepared.classes)

    def loss_acc(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        logits = torch.from_numpy(_logits(model, x))
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        return float(classification_loss(logits, soft_targets(yt, n))), correct_count(logits, yt) / len(y)

    tl, ta = loss_acc(train_x, train_y)
    vl, va = loss_acc(val_x, prepared.val.labels) if val_x is not None else (None, None)
    return {"epoch": 1, "lr": 0.0, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va,
            "img_per_s": len(train_y) / max(seconds, 1e-9), "seconds": seconds}


# ----------------------------------------------------------------------------- entry points
def model_chosen(overrides: dict[str, Any], config_file: str | None, preset: str) -> bool:
    """Whether the user named a model (a flag or keyword, the config file, or the preset): then
    ``pretrained: auto`` keeps it and trains from scratch."""
    keys = set(overrides) | set(read_config_file(config_file) if config_file else {}) | set(PRESETS[preset])
    return "model" in keys


def train(cfg: TrainConfig, resume: Any = None, console: Console | None = None, model_chosen: bool = False,
          on_step: Any = None) -> RunResult:
    """Train from ``cfg``: pretrained (``cfg.pretrained``: auto resolved here) or from scratch."""
    cfg = resolve_pretrained(cfg, model_chosen)
    if cfg.pretrained == "none":
        return train_from_scratch(cfg, resume=resume, console=console, on_step=on_step)
    if resume is not None:
        raise ConfigError(f"--resume continues from-scratch runs only; a pretrained run is re-run in about a "
                          f"minute (its features are cached). Received: pretrained={cfg.pretrained!r}")
    if cfg.nproc > 1:
        raise ConfigError(f"a pretrained run uses one process (its features take seconds); pass --nproc 1 or "
                          f"--pretrained none. Received: nproc={cfg.nproc}")
    return train_transfer(cfg, console)


def train_command(overrides: dict[str, Any], config_file: str | None = None, resume: str | None = None) -> int:
    """``convlens train``: the pretrained path when chosen, else the from-scratch trainer's command."""
    if resume is None:
        cfg = command_config(overrides, config_file)
        cfg = resolve_pretrained(cfg, model_chosen(overrides, config_file, cfg.preset))
        if cfg.pretrained != "none":
            train(cfg)
            return 0
        overrides = {**overrides, "pretrained": "none"}
    return train_from_scratch_command(overrides, config_file, resume)
