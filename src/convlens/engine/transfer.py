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
4. optionally fine-tune the last units for ``finetune_epochs`` in the trainer's loop (AdamW,
   cosine; the recipe's ``finetune_*`` keys: the share of units, the head at ``finetune_lr`` and
   each unit before it at ``finetune_lr_decay`` times the next one's rate, batch-norm statistics frozen or
   updated, warm-up, crops, early stopping; the head-only epoch stays the fallback, as the best
   validated epoch is what the bundle keeps): checkpoints, Ctrl-C, ``--resume``
   and DDP (``--nproc``: rank 0 fits the head, every rank takes its weights) as from scratch
   (without fine-tuning, a multi-process run ends after the head: the features were its work);
5. the usual evaluation, report and bundle (:func:`convlens.engine.run_folder.finish_run`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
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
from convlens.engine.optim import build_optimizer, layerwise_groups
from convlens.engine.run_folder import say
from convlens.engine.trainer import Trainer, prepare_data

HEAD_L2 = 1.0  # L2 on the standardised head weights when too few images to cross-validate
HEAD_L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # what cross-validation chooses from (docs/benchmarks.md)
# Label smoothing tried by cross-validation: 0.1 was never better than none by more than noise on
# the shared datasets (docs/benchmarks.md), and it shrinks the logits the temperature then undoes.
HEAD_SMOOTHING = (0.0,)
HEAD_FOLDS = 5
HEAD_MAX_ITER = 100


# ----------------------------------------------------------------------------- linear head
def fit_linear_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                    weights: torch.Tensor | None = None, label_smoothing: float = 0.0, l2: float = HEAD_L2,
                    max_iter: int = HEAD_MAX_ITER,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense layer ``(weight (out_units, C), bias)`` fitted by full-batch L-BFGS on features.

    Minimises the training loss (:func:`classification_loss`: one sigmoid unit for two classes,
    softmax otherwise) plus ``l2 * |W|^2 / 2`` on standardised features; the standardisation is
    folded back into the returned weights, so ``features @ weight.T + bias`` are the logits.
    ``init``: a previous fit's ``(weight, bias)`` to start from (a warm start along an L2 path;
    the optimum is the same, it is reached in fewer steps).
    """
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    targets = soft_targets(torch.from_numpy(np.asarray(labels, dtype=np.int64)), num_classes)
    out_units = 1 if num_classes == 2 else num_classes
    if init is None:
        w, b = torch.zeros(out_units, x.shape[1]), torch.zeros(out_units)
    else:  # the same logits in standardised coordinates
        w, b = init[0] * sd, init[1] + init[0] @ mu
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
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


def head_rows(x: np.ndarray, y: np.ndarray, flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows a head is fitted on: ``x`` and, with ``flipped``, the mirrored images' rows after them."""
    return (x, y) if flipped is None else (np.concatenate([x, flipped]), np.concatenate([y, y]))


def head_logits(features: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """The dense layer on pooled features: what the model's head computes, float32 ``(N, out_units)``."""
    with torch.no_grad():
        return (torch.from_numpy(np.asarray(features, dtype=np.float32)) @ weight.T + bias).numpy()


@dataclass
class HeadChoice:
    """The head's settings chosen by cross-validation on the training features, and the evidence."""

    l2: float
    label_smoothing: float
    folds: int  # 0: too few images per class to cross-validate (the defaults were kept)
    cv_accuracy: float | None
    cv_loss: float | None  # out-of-fold log loss after temperature scaling (a proper score, scale-free)
    candidates: list[dict[str, float]]  # every setting tried with its cross-validated accuracy and loss
    oof_logits: np.ndarray | None  # (N, out_units) at the chosen setting: what the temperature is fitted on
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Every field but the out-of-fold logits (checkpoints, the bundle's metrics)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "oof_logits"}


def cross_validated_logits(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: list[Any],
                           l2s: tuple[float, ...], *, flipped: np.ndarray | None = None,
                           **fit: Any) -> dict[float, np.ndarray]:
    """For each L2 in ``l2s``, every image's logits from the head fitted on the other folds (an
    image and its mirror stay on the same side). Along the path from the strongest L2 down each
    fit starts from the previous one: the weak-L2 fits, slow from zero, then take a few steps."""
    out_units = 1 if num_classes == 2 else num_classes
    out = {l2: np.zeros((len(labels), out_units), dtype=np.float32) for l2 in l2s}
    for train, held in folds:
        x, y = head_rows(features[train], labels[train], None if flipped is None else flipped[train])
        init = None
        for l2 in sorted(l2s, reverse=True):
            init = fit_linear_head(x, y, num_classes, l2=l2, init=init, **fit)
            out[l2][held] = head_logits(features[held], *init)
    return out


def select_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *, flipped: np.ndarray | None = None,
                weights: torch.Tensor | None = None, smoothing: tuple[float, ...] = HEAD_SMOOTHING,
                grid: tuple[float, ...] = HEAD_L2_GRID, folds: int = HEAD_FOLDS, seed: int = 0) -> HeadChoice:
    """The L2 strength (and label smoothing) of the head, chosen by stratified ``folds``-fold
    cross-validation on the training features alone (deterministic in ``seed``).

    The one-standard-error rule: the strongest L2 whose out-of-fold accuracy is within one
    binomial standard error of the best (differences smaller than that are noise; the stronger
    head was the better one on held-out photos: docs/benchmarks.md). With fewer than two images
    in some class nothing is cross-validated and :data:`HEAD_L2` is kept.
    """
    from sklearn.model_selection import StratifiedKFold

    from convlens.evaluate.calibration import fit_temperature, log_loss

    t0 = time.perf_counter()
    y = np.asarray(labels, dtype=np.int64)
    k = min(folds, int(np.bincount(y, minlength=num_classes)[np.unique(y)].min()))
    if k < 2:
        return HeadChoice(HEAD_L2, 0.0, 0, None, None, [], None, time.perf_counter() - t0)
    splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    x = np.asarray(features, dtype=np.float32)
    candidates, logits = [], {}
    for ls in smoothing:
        path = cross_validated_logits(x, y, num_classes, splits, tuple(grid), flipped=flipped, weights=weights,
                                      label_smoothing=ls)
        for l2, oof in path.items():
            logits[(l2, ls)] = oof
            candidates.append({"l2": l2, "label_smoothing": ls,
                               "cv_accuracy": correct_count(torch.from_numpy(oof), torch.from_numpy(y)) / len(y),
                               "cv_loss": log_loss(oof, y, fit_temperature(oof, y))})
    top = max(c["cv_accuracy"] for c in candidates)
    near = [c for c in candidates if c["cv_accuracy"] >= top - float(np.sqrt(top * (1 - top) / len(y))) - 1e-12]
    best = max(near, key=lambda c: (c["l2"], c["cv_accuracy"], -c["cv_loss"]))
    return HeadChoice(best["l2"], best["label_smoothing"], k, best["cv_accuracy"], best["cv_loss"],
                      sorted(candidates, key=lambda c: (c["label_smoothing"], c["l2"])),
                      logits[(best["l2"], best["label_smoothing"])], time.perf_counter() - t0)


# ----------------------------------------------------------------------------- fine-tuning
def trainable_branches(model: Any, share: float = TrainConfig.finetune_units) -> list[list[torch.nn.Module]]:
    """The last ``share`` of the units (at least the head and one block) of each of a model's
    branches (one, or an ensemble's members, each ending in the shared head), in execution order:
    what fine-tuning updates (``finetune_units``)."""
    return [[m for _, _, m in units[-max(2, int(len(units) * share)):]] for units in model.unit_branches()]


def trainable_units(model: Any, share: float = TrainConfig.finetune_units) -> list[torch.nn.Module]:
    """The units of :func:`trainable_branches`, each once (an ensemble's head is in every branch)."""
    return list({id(m): m for branch in trainable_branches(model, share) for m in branch}.values())


def fit_head(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, *, flipped: np.ndarray | None = None,
             weights: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, HeadChoice]:
    """The head a pretrained run fits: its L2 chosen by :func:`select_head`, then fitted on all
    the training rows (and their mirrors' with ``flipped``). Training and lr-find both use it."""
    choice = select_head(train_x, train_y, num_classes, flipped=flipped, weights=weights, seed=seed)
    w, b = fit_linear_head(*head_rows(train_x, train_y, flipped), num_classes, weights=weights,
                           label_smoothing=choice.label_smoothing, l2=choice.l2)
    return w, b, choice


def fine_tuning_model(backbone: Backbone, num_classes: int, share: float = TrainConfig.finetune_units) -> torch.nn.Module:
    """The backbone for ``num_classes`` (the weights as read once by the recipe) with only
    :func:`trainable_units` (the last ``share``) trainable: what fine-tuning updates."""
    model = backbone.create(num_classes)
    model.requires_grad_(False)
    for unit in trainable_units(model, share):
        unit.requires_grad_(True)
    return model


def fine_tuning_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the trainable units with discriminative learning rates: the head at
    ``cfg.lr`` (the recipe's ``finetune_lr``), each unit before it ``finetune_lr_decay`` times
    the next one's rate (:func:`~convlens.engine.optim.layerwise_groups`)."""
    groups = layerwise_groups(trainable_branches(model, cfg.finetune_units), cfg.lr, cfg.finetune_lr_decay,
                              cfg.weight_decay)
    return build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)


def set_fine_tuning_mode(model: Any, cfg: TrainConfig) -> None:
    """Evaluation mode for the frozen units; with ``finetune_bn: train`` the trainable units
    train (their batch-norm statistics follow the new data's batches). ``frozen`` keeps every
    statistic: small batches of a new dataset would spoil them."""
    model.eval()
    if cfg.finetune_bn == "train":
        for unit in trainable_units(model, cfg.finetune_units):
            unit.train()


def finetune_start(backbone: Backbone, prepared: Any, cfg: TrainConfig, device: str = "cpu") -> torch.nn.Module:
    """The model fine-tuning starts from, as training fits it: the head of :func:`fit_head` on the
    (cached) training features, only the last units trainable (what lr-find sweeps)."""
    num_classes = len(prepared.classes)
    model = fine_tuning_model(backbone, num_classes, cfg.finetune_units)
    flipped = _features(backbone, prepared, prepared.train, cfg, Dist(), flip=True) if cfg.head_flip else None
    w, b, _ = fit_head(_features(backbone, prepared, prepared.train, cfg, Dist()), prepared.train.labels,
                       num_classes, flipped=flipped, seed=cfg.seed,
                       weights=class_weights(prepared.train.labels, num_classes, cfg.class_weights))
    fc = model.gap_linear_head()
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)
    return model.to(device)


class FineTuner(Trainer):
    """The pretrained path in the trainer's loop: epoch 1 fits the head on frozen features, then
    the last units (:func:`trainable_units`) fine-tune (``finetune_*``: their share, layer-wise
    learning-rate decay, batch-norm mode, warm-up, early stopping and crops)."""

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
        if records and all(r.info.grayscale for r in records):
            say(self.console, "note: grayscale images: the channel is replicated 3x for the RGB backbone")
        self.marks["decode"] = time.perf_counter()
        return prepared

    def build_model(self, num_classes: int) -> torch.nn.Module:
        """The backbone (its head fitted in :meth:`begin`, or restored), only the last units training."""
        model = fine_tuning_model(self.backbone, num_classes, self.cfg.finetune_units).to(self.dev.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Discriminative learning rates over the trainable units (:func:`fine_tuning_optimizer`)."""
        return fine_tuning_optimizer(self.model, self.cfg)

    def set_train_mode(self) -> None:
        set_fine_tuning_mode(self.model, self.cfg)

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
            _, epoch_s, finish_s = self.probe_speed(budget.REPORT_PASSES)
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

    def _head_features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(training features, their labels, the mirrored images' features with --head-flip,
        validation features) from the feature cache, on every rank: each computes its share of
        what is missing (:func:`cached_features` with ``dist``)."""
        cfg, prepared = self.cfg, self.prepared
        backbone = self.backbone  # its own copy of the weights on the CPU: the model to train stays on its device
        train_x = _features(backbone, prepared, prepared.train, cfg, self.dist)
        flip_x = _features(backbone, prepared, prepared.train, cfg, self.dist, flip=True) if cfg.head_flip else None
        val_x = _features(backbone, prepared, prepared.val, cfg, self.dist) if self.n_val else None
        self.marks["features"] = time.perf_counter()
        return train_x, prepared.train.labels, flip_x, val_x

    def _fit_head(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The head's weight and bias fitted on (cached) features at the L2 cross-validation
        chose (:func:`select_head`), and its history row; the choice and the temperature fitted on
        its out-of-fold logits are kept in ``self.head`` (and in checkpoints)."""
        from convlens.evaluate.calibration import calibration_record, fit_temperature

        cfg, prepared = self.cfg, self.prepared
        train_x, train_y, flip_x, val_x = self.head_inputs
        t = time.perf_counter()
        num_classes = len(self.classes)
        weights = class_weights(prepared.train.labels, num_classes, cfg.class_weights)
        w, b, choice = fit_head(train_x, train_y, num_classes, flipped=flip_x, weights=weights, seed=cfg.seed)
        fit_x, fit_y = head_rows(train_x, train_y, flip_x)
        seconds = time.perf_counter() - t
        self.head = {"choice": choice.to_dict(), "calibration": None if choice.oof_logits is None else
                     calibration_record(choice.oof_logits, train_y, fit_temperature(choice.oof_logits, train_y),
                                        f"out-of-fold logits of the head's {choice.folds}-fold cross-validation")}
        say(self.console, f"head: L2 {choice.l2:g} chosen by {choice.folds}-fold cross-validation "
                          f"(accuracy {choice.cv_accuracy:.4f}) in {choice.seconds:.1f}s" if choice.folds else
                          f"head: L2 {choice.l2:g} (too few images per class to cross-validate)")

        def loss_acc(x: np.ndarray, y: np.ndarray, *loss_options: Any) -> tuple[float, float]:
            logits = torch.from_numpy(head_logits(x, w, b))  # the model's dense layer on pooled features
            yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
            loss = classification_loss(logits, soft_targets(yt, num_classes), *loss_options)
            return float(loss), correct_count(logits, yt) / len(y)

        # Training: the loss the fine-tuning epochs report (class weights, smoothing); validation: plain.
        tl, ta = loss_acc(fit_x, fit_y, weights, cfg.label_smoothing)
        vl, va = loss_acc(val_x, prepared.val.labels) if val_x is not None else (None, None)
        return w, b, {"epoch": 1, "lr": 0.0, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va,
                      "img_per_s": len(fit_y) / max(seconds, 1e-9), "seconds": seconds}

    def hold_out(self, prepared: Any) -> tuple[Any, Any]:
        """Nothing: the head's temperature comes from its cross-validation's out-of-fold logits."""
        return prepared, None

    def snapshot(self, epoch_done: int, step_in_epoch: int, finished: bool = False) -> dict[str, Any]:
        return {**super().snapshot(epoch_done, step_in_epoch, finished), "head": getattr(self, "head", None)}

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self.head = state.get("head")

    def head_only(self) -> bool:
        """Whether the final weights are the fitted head on the frozen backbone (no fine-tuning
        epoch ran, or none beat the head)."""
        return self.cfg.finetune_epochs == 0 or self.best.get("epoch") == 1

    def finish_inputs(self) -> dict[str, Any]:
        """The head's temperature and the cached training features when the backbone stayed
        frozen; a fine-tuned model is described by its own features (and is not calibrated:
        its training images are no longer held out from anything). No curves without fine-tuning."""
        head = getattr(self, "head", None) or {}
        frozen = self.head_only()
        # Cached by the head fit (this process, rank 0, holds every row): no collective here.
        train = _features(self.backbone, self.prepared, self.prepared.train, self.cfg, Dist()) if frozen else None
        return {"calibration": head.get("calibration") if frozen else None, "train_features": train,
                "training": self.training_rows(head), **({"curves": None} if len(self.history) <= 1 else {})}

    def training_rows(self, head: dict[str, Any]) -> dict[str, Any]:
        """The report's "How it was trained": the phases and their seconds, the head's choice."""
        phases = self.extra_metrics()["seconds"]
        rows: dict[str, Any] = {f"{k} (s)": round(v, 1) for k, v in phases.items() if k != "finetune" or v > 0.05}
        choice = head.get("choice") or {}
        if choice.get("folds"):
            tried = ", ".join(f"{c['l2']:g}: {c['cv_accuracy']:.4f}" for c in choice["candidates"])
            rows["head L2 (chosen)"] = f"{choice['l2']:g} by {choice['folds']}-fold cross-validation on the " \
                                       f"training features, accuracy {choice['cv_accuracy']:.4f}"
            rows["L2 tried (cross-validated accuracy)"] = tried
        elif choice:
            rows["head L2"] = f"{choice['l2']:g} (too few images per class to cross-validate)"
        cal = head.get("calibration")
        if cal and self.head_only():
            rows["temperature"] = f"{cal['temperature']:.3f}, fitted on the {cal['fitted_on']}"
        elif self.cfg.finetune_epochs:
            rows["fine-tuning"] = f"{self.cfg.finetune_epochs} epochs; best epoch {self.best.get('epoch')}"
        return rows

    def _budget_spent(self, plan: budget.PretrainedPlan) -> bool:
        """Whether what is left of the budget is less than one feature pass over the training
        images (an epoch costs more): then not even the speed probe's steps are spent."""
        img_s = plan.feature_img_s.get(plan.backbone)
        left = plan.budget_s * budget.SAFETY - (time.perf_counter() - self.budget_start)
        return img_s is not None and left < self.n_train / img_s

    def extra_metrics(self) -> dict[str, Any]:
        m, now = self.marks, time.perf_counter()
        features, head = m.get("features", m["decode"]), m.get("head", m["decode"])  # resumed: none
        choice = (getattr(self, "head", None) or {}).get("choice")
        return {"pretrained": self.backbone.source.to_dict(),
                "seconds": {"decode": m["decode"] - m["start"], "features": features - m["decode"],
                            "head": head - features, "finetune": now - head},
                **({"head": choice} if choice else {})}


def _features(backbone: Backbone, prepared: Any, subset: Any, cfg: TrainConfig, dist: Dist,
              flip: bool = False) -> np.ndarray:
    return cached_features(backbone, subset.images, subset_hashes(prepared, subset.paths), prepared.root,
                           prep=prepared.preprocessing, cache_dir=cfg.cache_dir, precision="bf16", flip=flip,
                           dist=dist)

