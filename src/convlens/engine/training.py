"""The one training entry: ``convlens train`` and ``convlens.train()`` both resolve a
:class:`~convlens.engine.recipe.Recipe` and hand it to :func:`train`, which runs the trainer's
loop (:class:`~convlens.engine.trainer.Trainer`) with the recipe's strategy: from scratch, or
the pretrained path (:class:`~convlens.engine.transfer.FineTuner`: the head fit as epoch 1, then
optional fine-tuning). ``--nproc N`` relaunches the same command under torchrun, after checking
and caching the data once here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from rich.console import Console

from convlens.config import TrainConfig
from convlens.engine import distributed
from convlens.engine.recipe import Recipe, recipe_for, resolve
from convlens.engine.run_folder import RunResult, say
from convlens.engine.trainer import Trainer, TrainingInterrupted, prepare_data
from convlens.engine.transfer import FineTuner


def train(recipe: Recipe | TrainConfig, console: Console | None = None,
          on_step: Callable[[int, int], None] | None = None, chosen: Collection[str] = (),
          resume: str | Path | None = None) -> RunResult:
    """Train ``recipe`` (a :class:`TrainConfig` is resolved first, ``chosen`` naming the keys a
    user set, ``resume`` a run folder to continue) and write its run folder.

    ``on_step(epoch, step)`` is called after every optimisation step (0-based). Raises
    :class:`TrainingInterrupted` after writing a checkpoint when Ctrl-C is pressed.
    """
    if isinstance(recipe, TrainConfig):
        recipe = recipe_for(recipe, chosen, resume=resume)
    console = console or Console()
    if recipe.resume is None and distributed.from_env().is_main:
        for note in recipe.notes:
            say(console, note)
    if recipe.backbone is not None:
        return FineTuner(recipe.cfg, recipe.backbone, resume=recipe.resume, console=console,
                         time_plan=recipe.time_plan).fit(on_step)
    return Trainer(recipe.cfg, resume=recipe.resume, console=console).fit(on_step)


def train_command(overrides: dict[str, Any], config_file: str | None = None, resume: str | None = None) -> int:
    """``convlens train``: returns the exit code (130 after Ctrl-C, with the resume command)."""
    recipe = resolve(overrides, config_file, resume)
    cfg = recipe.cfg
    if distributed.should_launch(cfg.nproc):
        distributed.preflight(cfg.nproc, cfg.batch_size, cfg.device, cfg.precision)  # fail before starting
        prepare_data(cfg, Console(), backbone=recipe.backbone)  # check and cache once, before N processes start
        # Every process trains the same: the backbone chosen here, not again from the data.
        # With --time, the launcher's plan too (each process would probe the speeds again).
        chose = {"pretrained": cfg.pretrained} if recipe.time_plan is None else {
            "pretrained": cfg.pretrained, "head_flip": cfg.head_flip, "finetune_epochs": cfg.finetune_epochs}
        args = {**overrides, **chose} if resume is None else overrides
        return distributed.launch(cfg.nproc, distributed.cli_arguments(args, config_file, resume))
    try:
        train(recipe)
    except TrainingInterrupted as e:
        print(f"convlens train: interrupted; checkpoint saved to {e.checkpoint}. "
              f"Resume with: convlens train --resume {e.run_dir}", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    return 0
