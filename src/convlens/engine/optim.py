"""Optimizers and learning-rate schedules.

Schedules are plain functions of the optimisation step (``lr_factor``) driven by a
``LambdaLR`` stepped once per batch, so a schedule is rebuilt exactly from the config on
resume and its state in a checkpoint is only a step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from convlens.config import OPTIMIZERS, SCHEDULES, check_choice

# One-cycle shape (as in Smith's one-cycle and torch's OneCycleLR): start at lr / 25, reach the
# peak after 25% of the steps, anneal with a cosine to lr / (25 * 1e4).
ONECYCLE_PCT = 0.25
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4
# Warm-up starts at this fraction of the peak rather than at zero, so the first step learns.
WARMUP_START = 0.01


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters so weight decay hits conv/dense weights but not biases or norm scales.

    Decaying BatchNorm scales and biases only fights the normalisation (common practice in
    timm and nanoGPT: decay tensors with two or more dimensions).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def layerwise_groups(branches: Sequence[Sequence[nn.Module]], lr: float, decay: float,
                     weight_decay: float) -> list[dict]:
    """Parameter groups with discriminative learning rates (layer-wise decay, as in ULMFiT and
    BEiT): the last unit of each branch (the head) at ``lr``, each unit before it at ``decay``
    times the rate of the one after it; a unit in several branches (an ensemble's shared head)
    once; within a unit, weight decay as :func:`param_groups`. Parameters that do not require
    gradients are left out."""
    groups, seen = [], set()
    for units in branches:
        for k, unit in enumerate(reversed(units)):
            if id(unit) not in seen:
                seen.add(id(unit))
                groups += [{**g, "lr": lr * decay**k} for g in param_groups(unit, weight_decay) if g["params"]]
    return groups


def build_optimizer(
    params: nn.Module | Iterable,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """Make one of ``rmsprop | sgd | adam | adamw``.

    RMSprop uses Keras's defaults (rho/alpha = 0.9, epsilon = 1e-7, no momentum) so the
    tutorial recipe trains like the original; PyTorch's own defaults (alpha 0.99, eps 1e-8)
    behave noticeably differently in the first epochs. ``params`` may be a model (then
    weight decay skips biases and normalisation parameters) or ready parameter groups.
    """
    name = check_choice("optimizer", name.lower(), OPTIMIZERS)
    groups = param_groups(params, weight_decay) if isinstance(params, nn.Module) else params
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-7, weight_decay=weight_decay,
                                   momentum=0.0)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=bool(nesterov and momentum > 0))
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the peak learning rate at optimisation ``step`` (0-based).

    ``constant`` and ``cosine`` ramp linearly from 1% to 100% over ``warmup_steps``; cosine
    then decays to zero at ``total_steps``. ``onecycle`` has its own warm-up (25% of the steps
    from lr/25) and ignores ``warmup_steps``.
    """
    total_steps = max(1, int(total_steps))
    step = min(max(0, int(step)), total_steps)
    if schedule == "onecycle":
        up = max(1, round(ONECYCLE_PCT * total_steps))
        start, end = 1.0 / ONECYCLE_DIV, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        if step < up:
            return start + (1.0 - start) * step / up
        t = (step - up) / max(1, total_steps - up)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    check_choice("schedule", schedule, SCHEDULES)
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    if step < warmup_steps:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-batch ``LambdaLR`` following :func:`lr_factor` over ``epochs * steps_per_epoch``."""
    total = max(1, int(epochs) * max(1, int(steps_per_epoch)))
    warmup = round(float(warmup_epochs) * max(1, int(steps_per_epoch)))
    lr_factor(schedule, 0, total, warmup)  # validate the name before building
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total, warmup))


# Progressive resizing (fastai): the first ``fraction`` of the epochs train at this share of the
# input size, on the downscaled random crops: cheaper steps while the model learns coarse shapes.
PROGRESSIVE_SCALE = 0.75


def progressive_epochs(fraction: float, epochs: int) -> int:
    """How many of ``epochs`` (the first ones) progressive resizing trains at the smaller size."""
    return min(epochs, round(fraction * epochs)) if fraction > 0 else 0


def progressive_size(image_size: int, fraction: float, epoch: int, epochs: int) -> tuple[int, int] | None:
    """The training input size of ``epoch`` (0-based), or ``None`` for the full ``image_size``."""
    return None if epoch >= progressive_epochs(fraction, epochs) else progressive_side(image_size)


def progressive_side(image_size: int) -> tuple[int, int]:
    """The smaller training size of progressive resizing: 3/4 of ``image_size``, a multiple of 8."""
    side = max(8, int(round(image_size * PROGRESSIVE_SCALE / 8)) * 8)
    return (side, side)


def progressive_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Downscale a float NCHW batch (0-255) to ``size`` with antialiasing."""
    import torch.nn.functional as F

    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
