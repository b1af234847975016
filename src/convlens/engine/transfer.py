"""Transfer learning: a pretrained backbone, frozen features, a fitted linear head, optional fine-tuning.

The pretrained strategy of the one trainer (:class:`convlens.engine.trainer.Trainer`): what
:func:`convlens.engine.training.train` runs for a recipe with a backbone (``convlens train DIR``
on photos, or ``--pretrained NAME|PATH``), as :class:`FineTuner`, with the backbone's parts:

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

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from convlens.config import TrainConfig, parse_duration
from convlens.engine import budget
from convlens.engine.distributed import Dist
from convlens.engine.factory import class_weights, classification_loss, correct_count, soft_targets
from convlens.engine.features import Backbone, cached_features, subset_hashes
from convlens.engine.run_folder import say
from convlens.engine.trainer import Trainer, prepare_data

HEAD_L2 = 1.0  # L2 on the standardised head weights: best or tied on both datasets (docs/benchmarks.md)
HEAD_MAX_ITER = 100


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


def finetune_start(backbone: Backbone, prepared: Any, cfg: TrainConfig, device: str = "cpu") -> torch.nn.Module:
    """The model fine-tuning starts from: the backbone with its head fitted on the (cached)
    training features and only :func:`trainable_units` trainable (what lr-find sweeps)."""
    num_classes = len(prepared.classes)
    model = backbone.create(num_classes)
    weights = class_weights(prepared.train.labels, num_classes, cfg.class_weights)
    w, b = fit_linear_head(_features(backbone, prepared, prepared.train, cfg, Dist()), prepared.train.labels, num_classes,
                           weights=weights, label_smoothing=cfg.label_smoothing)
    fc = model.gap_linear_head()
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)
    model.requires_grad_(False)
    for unit in trainable_units(model):
        unit.requires_grad_(True)
    return model.to(device)


class FineTuner(Trainer):
    """The pretrained path in the trainer's loop: epoch 1 fits the head on frozen features, then
    the last units (:func:`trainable_units`) fine-tune with batch-norm statistics frozen."""

    first_epoch = 1  # the head fit

    def __init__(self, cfg: TrainConfig, backbone: Backbone, resume: str | Path | None = None,
                 console: Console | None = None, time_plan: budget.PretrainedPlan | None = None) -> None:
        self.backbone = backbone
        self.marks = {"start": time.perf_counter()}
        self.time_plan = time_plan  # --time: what the recipe chose (its probe counts as time spent)
        self.budget_start = self.marks["start"] - (time_plan.spent_before_s if time_plan else 0.0)
        super().__init__(cfg, resume=resume, console=console)

    def prepare(self, cfg: TrainConfig, split_file: Path | None) -> Any:
        source, p = self.backbone.source, self.backbone.preprocessing
        where = "ImageNet weights from the installed package" if source.packaged else source.path
        say(self.console, f"backbone: {source.arch} ({where}); {p.size[0]}x{p.size[1]} {p.interpolation} "
                          f"centre crop, {self.threads} threads"
                          + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
                          + ("; --pretrained none trains from scratch" if source.packaged else ""))
        prepared = prepare_data(cfg, self.console, split_file, self.backbone)
        records = [prepared.cache.records[q] for q in prepared.train.paths[:2000]]
        if records and all(r.grayscale for r in records):
            say(self.console, "note: grayscale images: the channel is replicated 3x for the RGB backbone")
        self.marks["decode"] = time.perf_counter()
        return prepared

    def build_model(self, num_classes: int) -> torch.nn.Module:
        """The backbone (its head fitted in :meth:`begin`, or restored), only the last units training."""
        model = self.backbone.create(num_classes)  # the weights as read once by the recipe
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
        if self.cfg.time:
            self.plan = self._fit_finetuning_to_budget()

    def _plan_time(self) -> None:
        """The from-scratch plan does not apply: the recipe chose what the budget buys
        (:func:`budget.plan_pretrained`) and :meth:`begin` fits the fine-tuning epochs after the head."""
        return None

    def _fit_finetuning_to_budget(self) -> budget.PretrainedPlan:
        """``--time``, after the head: as many of the planned fine-tuning epochs as fit what is
        left, from a few measured steps; the schedule is rebuilt for them."""
        cfg = self.cfg
        plan = self.time_plan or budget.PretrainedPlan(  # under torchrun: the launcher's choice, as flags
            budget_s=parse_duration(cfg.time), backbone=cfg.pretrained, head_flip=cfg.head_flip,
            estimate_s=0.0, spent_before_s=0.0, feature_img_s={}, options=[], finetune_epochs=cfg.finetune_epochs)
        epochs = 0
        if cfg.finetune_epochs and not self._budget_spent(plan):
            speed = self.measure_speed()
            val_batches = len(self.val_loader) if self.val_loader is not None else 0
            epoch_s = budget.epoch_seconds(speed, self.steps_per_epoch, val_batches)
            finish_s = budget.finish_seconds(speed, val_batches, budget.REPORT_PASSES, self.check_batches())
            spent = time.perf_counter() - self.budget_start
            epochs = self.dist.broadcast(budget.finetune_epochs_that_fit(plan.budget_s, spent, epoch_s, finish_s,
                                                                         cfg.finetune_epochs))
            plan = replace(plan, finetune_epoch_s=epoch_s)
            say(self.console, f"time budget: {epochs} of {cfg.finetune_epochs} fine-tuning epochs of ~{epoch_s:.0f} s "
                              f"fit what the head left ({budget.format_seconds(plan.budget_s - spent)}, "
                              f"~{finish_s:.0f} s of it for the final evaluation)")
        elif cfg.finetune_epochs:
            say(self.console, "time budget: too little left after the head for a fine-tuning epoch")
        if cfg.finetune_epochs:
            self.set_epochs(1 + epochs)
        return replace(plan, finetune_epochs=epochs)

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

    def _budget_spent(self, plan: budget.PretrainedPlan) -> bool:
        """Whether what is left of the budget is less than one feature pass over the training
        images (an epoch costs more): then not even the speed probe's steps are spent."""
        img_s = plan.feature_img_s.get(plan.backbone)
        left = plan.budget_s * budget.SAFETY - (time.perf_counter() - self.budget_start)
        return img_s is not None and left < self.n_train / img_s

    def extra_metrics(self) -> dict[str, Any]:
        m, now = self.marks, time.perf_counter()
        features, head = m.get("features", m["decode"]), m.get("head", m["decode"])  # resumed: none
        return {"pretrained": self.backbone.source.to_dict(),
                "seconds": {"decode": m["decode"] - m["start"], "features": features - m["decode"],
                            "head": head - features, "finetune": now - head}}


def _features(backbone: Backbone, prepared: Any, subset: Any, cfg: TrainConfig, dist: Dist,
              flip: bool = False) -> np.ndarray:
    return cached_features(backbone, subset.images, subset_hashes(prepared, subset.paths), prepared.root,
                           prep=prepared.preprocessing, cache_dir=cfg.cache_dir, precision="bf16", flip=flip,
                           dist=dist)

