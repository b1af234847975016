"""``convlens lr-find``: sweep the learning rate exponentially and suggest one (Smith / fastai).

The model trains a few hundred steps with the learning rate growing from ``start_lr`` to
``end_lr``; the loss is smoothed with a forward-backward moving average, and the suggestion is
the learning rate where the smoothed loss falls fastest (steepest negative slope against
log(lr)) before its minimum. Nothing is written except the plot: the model is thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from convlens import runtime
from convlens.config import TrainConfig
from convlens.engine.factory import (
    create_generators,
    create_loaders,
    create_model,
    create_optimizer,
    create_step,
)
from convlens.engine.recipe import Recipe, recipe_for, resolve
from convlens.engine.trainer import epoch_seed, prepare_data
from convlens.engine.transfer import fine_tuning_optimizer, finetune_start, set_fine_tuning_mode
from convlens.errors import ConfigError
from convlens.files import write_bytes


@dataclass
class LRFindResult:
    """The sweep: learning rates, raw and smoothed losses, the suggestion and the plot's path."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    plot: Path | None
    flag: str = "--lr"  # the option the suggestion is for: --finetune-lr for a pretrained backbone


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (so early values are not dragged to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def smooth_zero_phase(losses: list[float], beta: float = 0.9) -> list[float]:
    """Forward then backward moving average: smooth like an EMA but without its lag.

    A one-way average trails the loss by about ``1 / (1 - beta)`` steps, which in a sweep
    over a few hundred steps shifts the curve (and the suggestion) by a decade of learning
    rate or more; running it both ways cancels the shift.
    """
    forward = smooth(losses, beta)
    return smooth(forward[::-1], beta)[::-1]


def suggest_lr(lrs: list[float], smoothed: list[float], skip_start: int | None = None) -> float | None:
    """The learning rate of the steepest descent of ``smoothed`` (in log(lr)) before its minimum."""
    n = len(lrs)
    if n < 5:
        return None
    skip = max(1, n // 10) if skip_start is None else skip_start
    y = np.asarray(smoothed, dtype=np.float64)
    x = np.log(np.asarray(lrs, dtype=np.float64))
    stop = int(np.argmin(y)) + 1
    if stop - skip < 3:
        skip = 0
    if stop - skip < 3:
        return None
    grad = np.gradient(y[skip:stop], x[skip:stop])
    return float(lrs[skip + int(np.argmin(grad))])


def sweep_optimizer(model: Any, cfg: TrainConfig, fine_tuning: bool) -> tuple[Any, list[float]]:
    """The optimizer training would build, and each parameter group's rate relative to the swept
    one: fine-tuning's layer-wise decayed groups keep their ratios (the head's is 1), so the
    suggestion is the ``--finetune-lr`` of the head as training applies it."""
    optimizer = fine_tuning_optimizer(model, cfg) if fine_tuning else create_optimizer(model, cfg, lr=cfg.lr)
    base = max(g["lr"] for g in optimizer.param_groups)
    return optimizer, [g["lr"] / base for g in optimizer.param_groups]


def lr_find(
    recipe: Recipe | TrainConfig,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 200,
    diverge: float = 4.0,
    out: str | Path | None = "lr_find.png",
    console: Console | None = None,
) -> LRFindResult:
    """Run the sweep on the model ``convlens train`` would train (the recipe's data, model,
    optimizer, augmentation and loss); plot to ``out``. For a pretrained backbone that is the
    fine-tuning step: the head fitted on the features, the last units training, batch-norm
    statistics frozen, so the suggestion is a ``--finetune-lr``."""
    recipe = recipe_for(recipe) if isinstance(recipe, TrainConfig) else recipe
    cfg = recipe.cfg
    if not (0 < start_lr < end_lr):
        raise ConfigError(f"lr-find needs 0 < start_lr < end_lr. Received: start_lr={start_lr}, end_lr={end_lr}")
    if steps < 5:
        raise ConfigError(f"lr-find needs at least 5 steps. Received: steps={steps}")
    console = console or Console()
    runtime.tune_allocator()
    runtime.configure_threads(cfg.threads)
    dev = runtime.resolve_device(cfg.device, cfg.precision)
    prepared = prepare_data(cfg, console, backbone=recipe.backbone)
    if recipe.backbone is not None:
        model = finetune_start(recipe.backbone, prepared, cfg, dev.device)
        set_fine_tuning_mode(model, cfg)  # batch-norm statistics as fine-tuning trains them
        what = f"the fine-tuning learning rate of {cfg.pretrained} (head fitted, last units training)"
    else:
        model = create_model(cfg, len(prepared.classes), prepared.preprocessing.channels, dev)
        model.train()
        what = f"{cfg.model} from scratch"
    optimizer, scales = sweep_optimizer(model, cfg, recipe.backbone is not None)
    step_fn = create_step(model, cfg, prepared, dev)
    loader, _ = create_loaders(cfg, prepared, dev)
    aug_gen, mix_gen = create_generators(dev)
    aug_gen.manual_seed(epoch_seed(cfg.seed, 0, 1))
    mix_gen.manual_seed(epoch_seed(cfg.seed, 0, 2))

    ratio = end_lr / start_lr
    lrs: list[float] = []
    losses: list[float] = []
    best, avg, beta = math.inf, 0.0, 0.9
    epoch, done = 0, False
    console.print(f"lr-find: {what}, {steps} steps from {start_lr:.0e} to {end_lr:.0e} on "
                  f"{len(prepared.train.labels)} images")
    while not done:
        loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            lr = start_lr * ratio ** (len(lrs) / (steps - 1))
            for g, scale in zip(optimizer.param_groups, scales, strict=True):
                g["lr"] = lr * scale
            loss, _ = step_fn(x, y.to(dev.device), aug_gen, mix_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value if math.isfinite(value) else math.inf)
            avg = beta * avg + (1 - beta) * (value if math.isfinite(value) else 1e12)
            sm = avg / (1 - beta ** len(lrs))
            best = min(best, sm)
            # Stop once the loss has clearly diverged: the rest of the curve says nothing.
            if not math.isfinite(value) or (len(lrs) > 10 and sm > diverge * best) or len(lrs) >= steps:
                done = True
                break
    smoothed = smooth_zero_phase([v if math.isfinite(v) else 1e12 for v in losses])
    suggestion = suggest_lr(lrs, smoothed)
    plot = None
    if out is not None:
        from convlens.evaluate.plots import lr_find_png

        plot = Path(out)
        write_bytes(plot, lr_find_png(lrs, [v if math.isfinite(v) else float("nan") for v in losses],
                                      smoothed, suggestion))
    return LRFindResult(lrs, losses, smoothed, suggestion, plot, flag="--finetune-lr" if recipe.pretrained else "--lr")


def lr_find_command(overrides: dict[str, Any], config_file: str | None = None, out: str = "lr_find.png") -> int:
    """``convlens lr-find [DIR]``: print the suggested learning rate and write the plot."""
    console = Console()
    recipe = resolve(overrides, config_file)
    for note in recipe.notes:
        console.print(note, highlight=False)
    if "time" in recipe.chosen and recipe.cfg.time is not None:
        console.print("note: lr-find runs a fixed sweep; --time applies to `convlens train`", highlight=False)
    result = lr_find(recipe, out=out, console=console)
    if result.suggestion is None:
        console.print(f"no clear descent in the loss; look at {result.plot} and pick a learning rate by eye")
    else:
        console.print(f"suggested learning rate: {result.suggestion:.2e} (use {result.flag} {result.suggestion:.2g})")
    console.print(f"plot: {result.plot}")
    return 0
