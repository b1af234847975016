"""Transfer learning: a pretrained backbone, frozen features, a fitted linear head, optional fine-tuning.

The fast path of ``convlens train DIR --pretrained NAME|PATH``, run by :class:`FineTuner`, the
trainer (:class:`convlens.engine.trainer.Trainer`) with the backbone's parts:

1. decode once into the cache at the backbone's own preprocessing (size, crop, interpolation,
   scaling: all stored in the bundle);
2. extract frozen features once (:mod:`convlens.engine.features`, cached on disk by file hash):
   in bf16 (the validation features only score the head on the way; the report evaluates the
   whole model through the inference path ``predict`` uses); under ``--nproc``/torchrun every
   rank computes its share and all ranks gather the rows over the process group;
3. fit the dense head (GAP -> dense, so the exact CAM works) by full-batch L-BFGS on the
   features, with the run's class weights and label smoothing, and write it into the model:
   epoch 1 of the run, checkpointed like any epoch;
4. optionally fine-tune the last units for ``finetune_epochs`` in the trainer's loop (AdamW at
   ``finetune_lr``, cosine, batch-norm statistics frozen): checkpoints, Ctrl-C, ``--resume``
   and DDP (``--nproc``: rank 0 fits the head, every rank takes its weights) as from scratch
   (without fine-tuning, a multi-process run ends after the head: the features were its work);
5. the usual evaluation, report and bundle (:func:`convlens.engine.run_folder.finish_run`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from convlens.config import TrainConfig, auto_backbone, chosen_keys, flag_of
from convlens.data.decode import decode
from convlens.data.scan import scan
from convlens.engine import distributed
from convlens.engine.factory import class_weights, classification_loss, correct_count, soft_targets
from convlens.engine.features import Backbone, cached_features, load_pretrained, subset_hashes
from convlens.engine.run_folder import RunResult, say
from convlens.engine.trainer import Trainer, TrainingInterrupted, prepare_data, train_config
from convlens.engine.trainer import train as train_from_scratch
from convlens.errors import ImageError
from convlens.models.pretrained import load_backbone

HEAD_L2 = 1.0  # L2 on the standardised head weights: best or tied on both datasets (docs/benchmarks.md)
HEAD_MAX_ITER = 100
SAMPLE_IMAGES = 24  # images decoded to decide whether a dataset is photos
BACKBONE_ONLY = ("arch", "finetune_epochs", "finetune_lr", "head_flip")  # options only a pretrained run uses


# ----------------------------------------------------------------------------- choice
def resolve_pretrained(cfg: TrainConfig, model_chosen: bool) -> TrainConfig:
    """Replace ``pretrained: auto`` by a backbone name or ``none`` (the rule: :func:`config.auto_backbone`).

    Whether the images are photos is judged on up to :data:`SAMPLE_IMAGES` really decoded files.
    """
    if cfg.pretrained != "auto":
        return cfg
    # Not --nproc: the rule is about the data (torchrun's processes never see --nproc), and a
    # pretrained run fine-tunes under DDP like any other.
    if cfg.data is None or cfg.preset != "default" or model_chosen:
        return replace(cfg, pretrained="none")
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


def backbone_config(cfg: TrainConfig) -> tuple[TrainConfig, Backbone]:
    """The backbone of ``cfg.pretrained`` and the configuration that trains it (recorded in the run).

    Its preprocessing; epochs = the head fit + ``finetune_epochs``; the fine-tuning recipe (AdamW
    at ``finetune_lr``, cosine, validated every epoch); no crop margin, flip averaging,
    progressive resizing, mixup, EMA or time budget (the from-scratch recipe's).
    """
    backbone = load_pretrained(cfg.pretrained, 2, cfg.arch, cfg.max_pixels)
    p = backbone.preprocessing
    return replace(cfg, arch=backbone.source.arch, model=backbone.source.arch, image_size=p.size[0], resize=p.resize,
                   scale=p.scale, mean=list(p.mean), std=list(p.std), channels=3, crop_margin=0.0,
                   flip_average=False, epochs=1 + cfg.finetune_epochs, optimizer="adamw", lr=cfg.finetune_lr,
                   schedule="cosine", warmup_epochs=0.0, val_every=1, progressive=0.0, mixup=0.0, ema=False,
                   time=None), backbone


def prepare_data_for(cfg: TrainConfig, console: Console, split_file: Path | None = None,
                     backbone: Backbone | None = None) -> tuple[TrainConfig, Any]:
    """:func:`prepare_data` for ``cfg`` (from :func:`backbone_config` when pretrained): at the
    backbone's interpolation and crop fraction."""
    if backbone is None and cfg.pretrained not in ("none", "auto"):
        cfg, backbone = backbone_config(cfg)
    pixels = None if backbone is None else {"interpolation": backbone.preprocessing.interpolation,
                                            "crop_fraction": backbone.preprocessing.crop_fraction}
    return prepare_data(cfg, console, split_file=split_file, pixels=pixels)


class FineTuner(Trainer):
    """The pretrained path in the trainer's loop: epoch 1 fits the head on frozen features, then
    the last units (:func:`trainable_units`) fine-tune with batch-norm statistics frozen."""

    first_epoch = 1  # the head fit

    def __init__(self, cfg: TrainConfig, backbone: Backbone, resume: str | Path | None = None,
                 console: Console | None = None) -> None:
        self.backbone = backbone
        self.marks = {"start": time.perf_counter()}
        super().__init__(cfg, resume=resume, console=console)

    def prepare(self, cfg: TrainConfig, split_file: Path | None) -> tuple[TrainConfig, Any]:
        source, p = self.backbone.source, self.backbone.preprocessing
        where = "ImageNet weights from the installed package" if source.packaged else source.path
        say(self.console, f"backbone: {source.arch} ({where}); {p.size[0]}x{p.size[1]} {p.interpolation} "
                          f"centre crop, {self.threads} threads"
                          + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
                          + ("; --pretrained none trains from scratch" if source.packaged else ""))
        cfg, prepared = prepare_data_for(cfg, self.console, split_file, self.backbone)
        records = [prepared.cache.records[q] for q in prepared.train.paths[:2000]]
        if records and all(r.grayscale for r in records):
            say(self.console, "note: grayscale images: the channel is replicated 3x for the RGB backbone")
        self.marks["decode"] = time.perf_counter()
        return cfg, prepared

    def build_model(self, num_classes: int) -> torch.nn.Module:
        """The backbone (its head fitted in :meth:`begin`, or restored), only the last units training."""
        model, _ = load_backbone(self.backbone.source.path, num_classes, self.backbone.source.arch)
        model.requires_grad_(False)
        for unit in trainable_units(model):
            unit.requires_grad_(True)
        model = model.to(self.dev.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def set_train_mode(self) -> None:
        self.model.eval()  # frozen batch-norm statistics: small batches of a new dataset would spoil them

    def begin(self) -> None:
        """Epoch 1: every rank extracts its share of the features, rank 0 fits the head on all of
        them, every rank takes its weights."""
        self.head_inputs = self._head_features()
        weight, bias, row = self.dist.broadcast(self._fit_head() if self.dist.is_main else None)
        fc = self.model.gap_linear_head()
        with torch.no_grad():
            fc.weight.copy_(weight)
            fc.bias.copy_(bias)
        self.marks["head"] = time.perf_counter()
        rows = self.n_train * (2 if self.cfg.head_flip else 1)
        say(self.console, f"linear head on {rows} feature rows: train_acc {row['train_acc']:.4f}"
                          + (f"  val_acc {row['val_acc']:.4f}" if row["val_acc"] is not None else "")
                          + f"  {row['seconds']:.1f}s")
        self.start_epoch = 1
        self.record(row)

    def _head_features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(training features, their labels, validation features) from the feature cache, on every
        rank: each computes its share of what is missing (:func:`cached_features` with ``dist``)."""
        cfg, prepared = self.cfg, self.prepared
        backbone = self.backbone  # its own copy of the weights on the CPU: the model to train stays on its device
        train_x = _features(backbone, prepared, prepared.train, cfg, self.dist)
        train_y = prepared.train.labels
        if cfg.head_flip:
            train_x = np.concatenate([train_x, _features(backbone, prepared, prepared.train, cfg, self.dist, flip=True)])
            train_y = np.concatenate([train_y, train_y])
        val_x = _features(backbone, prepared, prepared.val, cfg, self.dist) if self.n_val else None
        self.marks["features"] = time.perf_counter()
        return train_x, train_y, val_x

    def _fit_head(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The head's weight and bias fitted on (cached) features, and its history row."""
        cfg, prepared = self.cfg, self.prepared
        train_x, train_y, val_x = self.head_inputs
        t = time.perf_counter()
        num_classes = len(self.classes)
        weights = class_weights(prepared.train.labels, num_classes, cfg.class_weights)
        w, b = fit_linear_head(train_x, train_y, num_classes, weights=weights, label_smoothing=cfg.label_smoothing)
        seconds = time.perf_counter() - t

        def loss_acc(x: np.ndarray, y: np.ndarray, *loss_options: Any) -> tuple[float, float]:
            logits = torch.from_numpy(x) @ w.T + b  # the model's dense layer on pooled features
            yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
            loss = classification_loss(logits, soft_targets(yt, num_classes), *loss_options)
            return float(loss), correct_count(logits, yt) / len(y)

        # Training: the loss the fine-tuning epochs report (class weights, smoothing); validation: plain.
        tl, ta = loss_acc(train_x, train_y, weights, cfg.label_smoothing)
        vl, va = loss_acc(val_x, prepared.val.labels) if val_x is not None else (None, None)
        return w, b, {"epoch": 1, "lr": 0.0, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va,
                      "img_per_s": len(train_y) / max(seconds, 1e-9), "seconds": seconds}

    def extra_metrics(self) -> dict[str, Any]:
        m, now = self.marks, time.perf_counter()
        features, head = m.get("features", m["decode"]), m.get("head", m["decode"])  # resumed: none
        return {"pretrained": self.backbone.source.to_dict(),
                "seconds": {"decode": m["decode"] - m["start"], "features": features - m["decode"],
                            "head": head - features, "finetune": now - head}}


def _features(backbone: Backbone, prepared: Any, subset: Any, cfg: TrainConfig, dist: distributed.Dist,
              flip: bool = False) -> np.ndarray:
    return cached_features(backbone, subset.images, subset_hashes(prepared, subset.paths), prepared.root,
                           prep=prepared.preprocessing, cache_dir=cfg.cache_dir, precision="bf16", flip=flip,
                           dist=dist)


# ----------------------------------------------------------------------------- entry points
def note_replaced_options(before: TrainConfig, after: TrainConfig, chosen: Collection[str], console: Console) -> None:
    """Say which chosen options the pretrained recipe (:func:`backbone_config`) replaced, once:
    a flag that silently did nothing would mislead."""
    replaced = [k for k in sorted(chosen) if k not in ("data", "pretrained", "arch") and hasattr(before, k)
                and (getattr(before, k) != getattr(after, k) or (k == "finetune_lr" and not after.finetune_epochs))]
    if replaced and distributed.from_env().is_main:
        flags = ", ".join(f"{flag_of(k)} {getattr(before, k)}" for k in replaced)
        say(console, f"note: {after.pretrained} brings its own recipe, so {flags} do not apply "
                     "(--finetune-epochs N adds fine-tuning epochs at --finetune-lr; --pretrained none trains from "
                     "scratch with them)")


def note_unused_backbone_options(chosen: Collection[str], console: Console) -> None:
    """A from-scratch run says, once, which chosen options only a pretrained backbone uses."""
    unused = [k for k in BACKBONE_ONLY if k in chosen]
    if unused and distributed.from_env().is_main:
        flags = ", ".join(flag_of(k) for k in unused)
        say(console, f"note: this run trains from scratch, so {flags} (pretrained backbones only) do not apply; "
                     "--pretrained efficientnet_lite0 uses them")


def train(cfg: TrainConfig, resume: str | Path | None = None, console: Console | None = None,
          chosen: Collection[str] = (), on_step: Any = None) -> RunResult:
    """Train from ``cfg``: pretrained (``cfg.pretrained``; auto resolved here) or from scratch.

    ``resume``: a run folder to continue (its config says which kind; a pretrained run interrupted
    during fine-tuning continues it). ``chosen``: the keys the user set (:func:`config.chosen_keys`):
    naming a model keeps ``pretrained: auto`` from scratch, and the others a backbone replaces are named.
    """
    if resume is None:
        cfg = resolve_pretrained(cfg, "model" in chosen)
    if cfg.pretrained in ("none", "auto"):  # a run records its choice: "auto" only in from-scratch runs
        if resume is None:
            note_unused_backbone_options(chosen, console or Console())
        return train_from_scratch(cfg, resume=resume, console=console, on_step=on_step)
    before, (cfg, backbone) = cfg, backbone_config(cfg)
    if resume is None:
        note_replaced_options(before, cfg, chosen, console or Console())
    return FineTuner(cfg, backbone, resume=resume, console=console).fit(on_step)


def train_command(overrides: dict[str, Any], config_file: str | None = None, resume: str | None = None) -> int:
    """``convlens train``: returns the exit code (130 after Ctrl-C, with the resume command).

    ``--nproc N`` starts N processes through torchrun, after checking and caching the data once here.
    """
    cfg = train_config(overrides, config_file, resume)
    chosen = chosen_keys(overrides, config_file, cfg.preset)
    if resume is None:  # chosen once, here: every process trains the same
        cfg = resolve_pretrained(cfg, "model" in chosen)
        overrides = {**overrides, "pretrained": cfg.pretrained}
    if distributed.should_launch(cfg.nproc):
        distributed.preflight(cfg.nproc, cfg.batch_size, cfg.device, cfg.precision)  # fail before starting
        prepare_data_for(cfg, Console())  # check and cache once, before N processes start
        return distributed.launch(cfg.nproc, distributed.cli_arguments(overrides, config_file, resume))
    try:
        train(cfg, resume=resume, chosen=chosen)
    except TrainingInterrupted as e:
        print(f"convlens train: interrupted; checkpoint saved to {e.checkpoint}. "
              f"Resume with: convlens train --resume {e.run_dir}", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    return 0
