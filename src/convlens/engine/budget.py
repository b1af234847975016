"""``--time BUDGET``: choose the number of epochs so the whole run fits a wall-clock budget.

The learning-rate schedule (warm-up, then decay to its end) is a function of the total number
of steps, so the epochs must be known before training starts: the trainer measures the speed
of a few real training steps and validation batches on a throw-away copy of the model
(:func:`measure_speed`), and :func:`plan_epochs` fits the epochs, each followed by its
validation, plus the final evaluation into what is left of the budget. A few probe steps can be
10% off, so after the first real epoch :func:`replan` refits the plan to its measured speed (the
trainer rebuilds the schedule for the new total). Without a budget, :func:`estimate_seconds`
gives the expected duration so long runs can say so up front.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from convlens.engine.optim import progressive_epochs

# The final evaluation runs the validation set once per view and then writes figures, the
# report and the bundle; this covers the latter on a 2-core CPU (measured ~2-4 s).
FINISH_OVERHEAD_S = 5.0
# Per-epoch bookkeeping besides the steps: checkpoint writes, metrics.csv, the loader's shuffle.
EPOCH_OVERHEAD_S = 0.3
# Plan for a little less than the budget: speed drifts (turbo, other processes) and the runs
# must end within +10% of it.
SAFETY = 0.97
# Print the estimate when a run without --time is expected to take longer than this.
LONG_RUN_S = 600.0
# After the first epoch the plan is refitted when that epoch's training took more than this
# share more or less than the probe predicted (a few probe steps can be off by 10%).
REPLAN_TOLERANCE = 0.05


@dataclass
class Speed:
    """Measured seconds per training step and per validation batch."""

    step_s: float
    val_batch_s: float


@dataclass
class Plan:
    """What ``--time`` decided; saved as ``budget.json`` in the run folder."""

    budget_s: float
    epochs: int
    epoch_s: float
    finish_s: float
    spent_before_s: float
    estimate_s: float
    used_s: float | None = None
    small_epoch_s: float | None = None  # with progressive resizing: an epoch at the smaller size
    first_train_s: float | None = None  # the probe's estimate of the first epoch's training steps
    first_epoch_ratio: float | None = None  # measured / estimated, when the plan was refitted
    planned_epochs: int | None = None  # the epochs before the refit

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        """The choice in a few words, for the console line and the report."""
        return f"{self.epochs} epochs"


def epoch_seconds(speed: Speed, steps_per_epoch: int, val_batches: int) -> float:
    """Expected seconds of one epoch: its training steps, its validation and the bookkeeping."""
    return steps_per_epoch * speed.step_s + val_batches * speed.val_batch_s + EPOCH_OVERHEAD_S


def finish_seconds(speed: Speed, val_batches: int, views: int, check_batches: int = 0) -> float:
    """Expected seconds of the final evaluation (``views`` = 2 with flip averaging) and writing;
    ``check_batches``: batches of the bf16-against-fp32 check before it (one bf16 pass and one
    fp32 pass, counted as three bf16 passes)."""
    return views * (val_batches + 3 * check_batches) * speed.val_batch_s + FINISH_OVERHEAD_S


def plan_epochs(budget_s: float, spent_s: float, epoch_s: float, finish_s: float,
                small_epoch_s: float | None = None, progressive: float = 0.0) -> int:
    """The most epochs (at least 1) whose :func:`estimate_seconds` fits the budget (with
    progressive resizing, the first ``progressive`` of them cost ``small_epoch_s`` each)."""
    if budget_s <= 0 or epoch_s <= 0:
        raise ValueError(f"budget and epoch time must be positive. Received: budget_s={budget_s}, epoch_s={epoch_s}")
    limit = budget_s * SAFETY
    cheapest = min(epoch_s, small_epoch_s or epoch_s)
    epochs = max(1, math.floor((limit - spent_s - finish_s) / cheapest))  # an upper bound, then down
    while epochs > 1 and estimate_seconds(epochs, epoch_s, finish_s, spent_s, small_epoch_s, progressive) > limit:
        epochs -= 1
    return epochs


def replan(plan: Plan, first_train_s: float, progressive: float = 0.0) -> Plan | None:
    """The plan refitted to the first epoch's measured training time, or None when it is within
    :data:`REPLAN_TOLERANCE` of the estimate: every estimate scales by measured / estimated."""
    if not plan.first_train_s or first_train_s <= 0:
        return None
    ratio = first_train_s / plan.first_train_s
    if abs(ratio - 1.0) <= REPLAN_TOLERANCE:
        return None
    epoch_s = plan.epoch_s * ratio
    small = plan.small_epoch_s * ratio if plan.small_epoch_s is not None else None
    epochs = plan_epochs(plan.budget_s, plan.spent_before_s, epoch_s, plan.finish_s, small, progressive)
    estimate = estimate_seconds(epochs, epoch_s, plan.finish_s, plan.spent_before_s, small, progressive)
    return replace(plan, epochs=epochs, epoch_s=epoch_s, small_epoch_s=small, first_epoch_ratio=ratio,
                   estimate_s=estimate, planned_epochs=plan.epochs)


def estimate_seconds(epochs: int, epoch_s: float, finish_s: float, spent_s: float = 0.0,
                     small_epoch_s: float | None = None, progressive: float = 0.0) -> float:
    """Expected wall time of a run of ``epochs`` (the first ``progressive`` of them at
    ``small_epoch_s`` when given)."""
    small = progressive_epochs(progressive, epochs) if small_epoch_s is not None else 0
    return spent_s + small * (small_epoch_s or 0.0) + (epochs - small) * epoch_s + finish_s


def measure_speed(model: Any, optimizer: Any, step: Callable[[Any, Any], Any], train_batches: Any,
                  validate_batch: Callable[[Any, Any], Any], val_batches: Any, warmup: int = 2,
                  timed: int = 6) -> Speed:
    """Time ``timed`` training steps (after ``warmup`` untimed ones) and as many validation
    batches, on copies of ``model`` and ``optimizer`` so the run itself starts untouched.

    ``step(model, batch)`` returns the loss; ``validate_batch(model, batch)`` runs inference.
    ``train_batches``/``val_batches`` are iterables of batches (cycled if short).
    """
    import torch

    probe = copy.deepcopy(model)
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold keys its __init__ refuses
    opt = type(optimizer)(probe.parameters(), **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    batches = _cycle(train_batches, warmup + timed)
    probe.train()
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        loss = step(probe, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())  # wait for the step, as the training loop does
    step_s = (time.perf_counter() - t0) / timed
    probe.eval()
    vals = _cycle(val_batches, 1 + timed) if val_batches is not None else []
    t0 = 0.0
    with torch.inference_mode():
        for i, batch in enumerate(vals):
            if i == 1:
                t0 = time.perf_counter()
            validate_batch(probe, batch)
    val_s = (time.perf_counter() - t0) / timed if vals else 0.0
    return Speed(step_s=step_s, val_batch_s=val_s)


def _cycle(batches: Any, n: int) -> list[Any]:
    """The first ``n`` batches, starting over when ``batches`` is shorter (none if it is empty)."""
    return list(itertools.islice(itertools.cycle(batches), n))


class LongRunNotice:
    """An ``on_step`` hook for runs without ``--time``: after the first ``probe_steps`` steps it
    estimates the whole run and, when it exceeds :data:`LONG_RUN_S`, calls ``say`` once."""

    def __init__(self, epochs: int, steps_per_epoch: int, val_share: float, say: Callable[[str], None],
                 probe_steps: int = 8) -> None:
        self.epochs, self.steps_per_epoch, self.val_share = epochs, steps_per_epoch, val_share
        self.say, self.probe_steps = say, min(probe_steps, max(1, steps_per_epoch - 1))
        self.t0: float | None = None
        self.done = False

    def __call__(self, epoch: int, step: int) -> None:
        if self.done:
            return
        if self.t0 is None:  # the first step carries one-off costs: time from its end
            self.t0, self.first = time.perf_counter(), step
            return
        if step - self.first < self.probe_steps:
            return
        self.done = True
        step_s = (time.perf_counter() - self.t0) / (step - self.first)
        total = self.epochs * (self.steps_per_epoch * step_s * (1.0 + self.val_share) + EPOCH_OVERHEAD_S)
        if total > LONG_RUN_S:
            self.say(f"estimated training time {format_seconds(total)} for {self.epochs} epochs; "
                     f"--time BUDGET (e.g. --time 10m) chooses the epochs to fit a budget")


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``5400`` -> ``1h30m``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ----------------------------------------------------------------------------- pretrained runs
# ``--time`` on a pretrained run: the backbone's frozen features and the head fit are the run's
# work, so the budget chooses what that work is (docs/benchmarks.md, "What --time buys a
# pretrained run"), from the feature speed probed on a few batches of each candidate backbone.
@dataclass(frozen=True)
class PretrainedOption:
    """One thing a pretrained run can do: a backbone's head, on flip-augmented rows or not, and
    up to ``finetune_epochs`` fine-tuning epochs after it (as many as fit what the head leaves)."""

    backbone: str
    head_flip: bool = False
    finetune_epochs: int = 0


# In order of preference, each measured at least as accurate as the one before on the shared
# datasets (docs/benchmarks.md, "What --time buys a pretrained run"): the planner takes the last
# one whose estimate fits. The first is the default without --time. Two fine-tuning epochs after
# the Lite0 head gained on imagenette8 (96.75% -> 97.5%, ECE 0.195 -> 0.100) and cat_breeds5 (+1
# image), and the run keeps its best epoch, the head's included, so they cannot lose on the
# validation set. The head on the three Lite backbones' features together (one ensemble model,
# every member at Lite2's 260 px) is above both on imagenette8 (98.25%) and cats_and_dogs_filtered
# (99.8% against 99.2%) and level on cat_breeds5 (64.7%), at about five times Lite0's feature cost. Not offered: Lite1/Lite2
# alone (above Lite0 on imagenette8, below it on cat_breeds5, and 5-fold CV on the training rows
# does not tell which) and flip-augmented rows (no gain on any).
ENSEMBLE = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"
PRETRAINED_OPTIONS: tuple[PretrainedOption, ...] = (
    PretrainedOption("efficientnet_lite0"),
    PretrainedOption("efficientnet_lite0", finetune_epochs=2),
    PretrainedOption(ENSEMBLE),
)
HEAD_S = 5.0  # fitting the head on 1,280 cached features (2-core CPU, with its regularisation search)
HEAD_FEATURES = 1280  # ... and it grows about as the square root of the width (3,840: 1.8x measured)
DECODE_IMG_S = 150.0  # decoding into the cache at a backbone's size (2-core CPU, loaded: ~3x slower idle)
REPORT_PASSES = 2  # the report scores the validation set through predict's path (fp32: ~2 bf16 passes)
CHECK_IMAGES = 256  # finish_run's bf16-against-fp32 check (evaluate.bf16_check_size), counted as 3 passes


@dataclass
class PretrainedPlan:
    """What ``--time`` chose for a pretrained run; saved as ``budget.json`` in the run folder."""

    budget_s: float
    backbone: str
    head_flip: bool
    estimate_s: float
    spent_before_s: float
    feature_img_s: dict[str, float]  # probed on a few batches of each candidate backbone
    options: list[dict[str, Any]]  # every candidate with its estimate
    finetune_epochs: int = 0  # at most this many; after the head, as many as fit what is left
    finetune_epoch_s: float | None = None
    used_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _rounded(v) for k, v in asdict(self).items()}

    def summary(self, planned: bool = False) -> str:
        """The choice in a few words, for the console line and the report (``planned``: before
        the fine-tuning epochs are fitted, when they are a maximum)."""
        rows = " on flip-augmented rows" if self.head_flip else ""
        tune = (f", then {'up to ' if planned else ''}{self.finetune_epochs} fine-tuning epochs"
                if self.finetune_epochs else "")
        return f"{self.backbone} head{rows}{tune}"


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 2)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def option_seconds(option: PretrainedOption, n_train: int, n_val: int, img_s: float,
                   width: int = HEAD_FEATURES) -> float:
    """Expected wall time of a pretrained run's head doing ``option`` at ``img_s`` features per
    second: decoding, the training rows (twice with flips) and validation rows, the head, and the
    finish (the report's pass over the validation set, the bf16 check, the figures and the
    bundle); ``width`` is the number of features the head reads. Fine-tuning takes what is
    left (:func:`finetune_epochs_that_fit`)."""
    if img_s <= 0:
        raise ValueError(f"the feature speed must be positive. Received: img_s={img_s}")
    rows = n_train * (2 if option.head_flip else 1) + n_val
    check = min(CHECK_IMAGES, n_val) * 3
    return ((n_train + n_val) / DECODE_IMG_S + rows / img_s + HEAD_S * math.sqrt(width / HEAD_FEATURES)
            + (REPORT_PASSES * n_val + check) / img_s + FINISH_OVERHEAD_S)


def plan_pretrained(budget_s: float, spent_s: float, n_train: int, n_val: int, feature_img_s: dict[str, float],
                    options: tuple[PretrainedOption, ...] = PRETRAINED_OPTIONS,
                    feature_widths: dict[str, int] | None = None) -> PretrainedPlan:
    """The most preferred of ``options`` (the last) whose estimate fits the budget, among those
    whose backbone has a probed speed; when none fits, the fastest (the most preferred of equally
    fast ones: their fine-tuning epochs are fitted later to what is left, maybe none).
    ``feature_widths``: each backbone's feature count where it is not 1,280 (an ensemble's)."""
    if budget_s <= 0:
        raise ValueError(f"the budget must be positive. Received: budget_s={budget_s}")
    known = [o for o in options if o.backbone in feature_img_s]
    if not known:
        raise ValueError(f"no option's backbone has a measured speed. Received: {sorted(feature_img_s)}")
    rows = [{**asdict(o), "estimate_s": spent_s + option_seconds(o, n_train, n_val, feature_img_s[o.backbone],
                                                                 (feature_widths or {}).get(o.backbone, HEAD_FEATURES))}
            for o in known]
    fits = [i for i, r in enumerate(rows) if r["estimate_s"] <= budget_s * SAFETY]
    if not fits:  # the fastest; of equally fast ones the most preferred (fine-tuning then fits what is left: maybe none)
        fastest = min(r["estimate_s"] for r in rows)
        fits = [i for i, r in enumerate(rows) if r["estimate_s"] == fastest]
    pick = fits[-1]
    chosen = known[pick]
    return PretrainedPlan(budget_s=budget_s, backbone=chosen.backbone, head_flip=chosen.head_flip,
                          finetune_epochs=chosen.finetune_epochs, estimate_s=rows[pick]["estimate_s"], spent_before_s=spent_s,
                          feature_img_s=dict(feature_img_s), options=rows)


def finetune_epochs_that_fit(budget_s: float, spent_s: float, epoch_s: float, finish_s: float, most: int) -> int:
    """The fine-tuning epochs (0 to ``most``) that fit what is left of the budget after the head."""
    if epoch_s <= 0:
        raise ValueError(f"the epoch time must be positive. Received: epoch_s={epoch_s}")
    return max(0, min(most, math.floor((budget_s * SAFETY - spent_s - finish_s) / epoch_s)))
