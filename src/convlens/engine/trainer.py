"""``convlens train``: prepare the data, train, evaluate, and write a run folder with a bundle.

Run folder ``runs/<name>/``::

    config.yaml          the resolved configuration
    split.csv            every file with its class and subset
    metrics.csv          one row per epoch
    curves.png           loss and accuracy per epoch
    checkpoints/last.pt  written atomically every epoch (and on Ctrl-C); --resume continues it
    checkpoints/best.pt  the epoch with the best validation accuracy
    model.convlens       the bundle (best weights + preprocessing, classes, metrics, config)
    report.html          self-contained evaluation report on the validation set
    metrics.json, confusion_matrix.png, calibration.png, ...  (the evaluation's files)

Exact resume: the shuffle order, the augmentation and mixing generators and the global torch
RNG are re-seeded from ``(seed, epoch)`` at the start of every epoch, and their states are
saved in mid-epoch (Ctrl-C) checkpoints, so an interrupted and resumed run on the CPU ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from convlens import runtime
from convlens.config import (
    TrainConfig,
    dump_yaml,
    parse_duration,
    to_dict,
)
from convlens.display import clock, shows_progress
from convlens.engine import budget, distributed, tensorboard
from convlens.engine.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    CheckpointError,
    checkpoint_bytes,
    disk_full_hint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from convlens.engine.ema import ModelEma
from convlens.engine.factory import (
    classification_loss,
    correct_count,
    create_generators,
    create_loaders,
    create_model,
    create_optimizer,
    create_scheduler,
    create_step,
    soft_targets,
)
from convlens.engine.features import Backbone
from convlens.engine.optim import progressive_side, progressive_size
from convlens.engine.recipe import input_preprocessing
from convlens.engine.resume import open_run
from convlens.engine.run_folder import (
    BUNDLE_NAME,
    RunResult,
    finish_run,
    is_better,
    make_run_dir,
    say,
    write_metrics_csv,
)
from convlens.errors import ConfigError, DiskFullError
from convlens.evaluate import bf16_check_size
from convlens.files import write_bytes, write_json, write_text


class TrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was written to ``checkpoint``."""

    def __init__(self, run_dir: Path, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}")
        self.run_dir = run_dir
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------- helpers
def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one RNG stream of one epoch (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]).generate_state(2, np.uint64)[0] >> 1)


class _StopOnSigint:
    """First Ctrl-C asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._enabled = enabled

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSigint:
        # Signal handlers can only be installed from the main thread.
        if self._enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


@torch.inference_mode()
def _validate(model: torch.nn.Module, loader: Any, prep: Any, dev: runtime.DeviceInfo,
              channels_last: bool, num_classes: int,
              reduce: Callable[[list[float]], list[float]] | None = None) -> tuple[float | None, float | None]:
    """Plain (unsmoothed, unweighted) cross-entropy and accuracy on a subset.

    ``reduce`` sums ``[loss_sum, correct, n]`` over DDP ranks (each validates its own shard).
    """
    from convlens.data.loader import to_model_input

    if loader is None:
        return None, None
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        x = x.to(dev.device, non_blocking=True)
        y = y.to(dev.device, non_blocking=True)
        with runtime.autocast(dev):
            logits = model(to_model_input(x, prep, channels_last=channels_last))
        logits = logits.float()
        loss = classification_loss(logits, soft_targets(y, num_classes))
        loss_sum += float(loss) * len(y)
        correct += correct_count(logits, y)
        n += len(y)
    if reduce is not None:
        loss_sum, correct, n = reduce([loss_sum, correct, n])
    return (loss_sum / n, correct / n) if n else (None, None)


# ----------------------------------------------------------------------------- train
def prepare_data(cfg: TrainConfig, console: Console, split_file: str | Path | None = None,
                 backbone: Backbone | None = None) -> Any:
    """Check, split and cache ``cfg.data`` (resolved by the recipe) at the run's
    :class:`Preprocessing` (a ``backbone``'s whole); report skipped files.

    ``split_file``: reuse the split of an earlier run (``split.csv``).
    """
    from convlens.data.check import skipped_message
    from convlens.data.prepare import prepare_dataset

    prep, detect = input_preprocessing(cfg, backbone)
    prepared = prepare_dataset(cfg.data, prep, detect_channels=detect, val_fraction=cfg.val_fraction,
                               test_fraction=cfg.test_fraction, seed=cfg.seed, cache_dir=cfg.cache_dir,
                               workers=cfg.workers, min_side=cfg.min_side, progress=shows_progress(console),
                               split_file=split_file)
    if prepared.skipped:
        say(console, f"[yellow]{skipped_message(prepared.skipped)}[/yellow]")
    return prepared


class Trainer:
    """One training run: set-up (or restore), the epoch loop, checkpoints, and the finish.

    The loop is written once; a subclass changes the parts it trains (Ultralytics' BaseTrainer):
    :meth:`prepare` (the data), :meth:`build_model`, :meth:`begin` (a fresh run, before the
    loop), :meth:`set_train_mode` and :meth:`extra_metrics`. ``first_epoch``: the epochs a
    subclass completes in :meth:`begin` (the pretrained path's head fit); the learning-rate
    schedule covers the epochs after them.
    """

    first_epoch = 0

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None, console: Console | None = None) -> None:
        self.t0 = time.perf_counter()  # --time counts from here: data preparation is part of the run
        # torchrun's environment (one process without it); only rank 0 prints and writes files.
        self.dist = dist = distributed.from_env()
        if distributed.should_launch(cfg.nproc):  # a library call outside torchrun
            raise ConfigError(f"nproc > 1 runs one process per rank: use `convlens train --nproc {cfg.nproc}` "
                              f"or torchrun. Received: nproc={cfg.nproc}")
        self.console = dist.console(console or Console())
        if cfg.tensorboard and dist.is_main:
            tensorboard.require()  # before minutes of decoding
        runtime.tune_allocator()
        self.threads = runtime.configure_threads(cfg.threads or dist.default_threads())
        # threads=0 (auto): follow the cores other programs leave free, re-checked every second.
        self.governor = runtime.ThreadGovernor(self.threads, adaptive=not cfg.threads)
        self.dev = dev = dist.start(runtime.resolve_device(cfg.device, cfg.precision))
        batch_size = dist.per_process_batch(cfg.batch_size)  # batch_size is the global batch
        if dev.note:
            say(self.console, f"[yellow]note:[/yellow] {dev.note}")

        state: dict[str, Any] | None = None
        split_file: Path | None = None
        if resume is not None:
            state, run_dir, split_file = open_run(resume, cfg, dist.is_main)
        with dist.main_first():  # each machine's first process builds the cache; the others then read it
            self.prepared = self.prepare(cfg, split_file)
        self.cfg = cfg
        self.classes = list(self.prepared.classes)
        self.prep = self.prepared.preprocessing
        self.prepared, self.calibration_set = self.hold_out(self.prepared)
        if state is not None and list(state["classes"]) != self.classes:
            raise CheckpointError(f"the dataset's classes {self.classes} differ from the run's "
                                  f"{list(state['classes'])}; resume with the same data")
        if state is None:  # made by rank 0 only (no name-2 from another rank), named to all
            run_dir = dist.broadcast(make_run_dir(cfg.project, cfg.name, cfg.exist_ok) if dist.is_main else None)
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / CHECKPOINT_DIR
        with self.disk_full_advice():
            self._start(state, batch_size)

    def _start(self, state: dict[str, Any] | None, batch_size: int) -> None:
        """Write the run folder's configuration and split, build the model and the training parts,
        and restore ``state`` (a resumed run) or begin a fresh one."""
        from convlens.data.split import write_split_csv

        cfg, dist, run_dir = self.cfg, self.dist, self.run_dir
        if dist.is_main:
            write_text(run_dir / "config.yaml", dump_yaml(cfg))
            write_split_csv(run_dir / "split.csv", self.prepared.split_rows)

        self.model = self.build_model(len(self.classes))
        self._build_parts(batch_size, fresh=state is None)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "val_acc": None, "val_loss": None, "train_loss": None,
                                     "bad_epochs": 0}
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.start_epoch, self.skip_steps = 0, 0
        self.partial = _fresh_partial()
        self.mid_epoch_rng: dict[str, Any] | None = None
        if state is not None:
            self._restore(state)
        self.tb = tensorboard.open_writer(run_dir, self.start_epoch) if cfg.tensorboard and dist.is_main else None
        if state is None:
            self.begin()

    @contextlib.contextmanager
    def disk_full_advice(self) -> Iterator[None]:
        """A full disk while writing the run folder: say how to continue (``--resume``) or where
        else to write; a full cache disk keeps the cache's own advice."""
        try:
            yield
        except DiskFullError as e:
            if not Path(e.path).resolve().is_relative_to(self.run_dir.resolve()):
                raise
            raise e.with_hint(disk_full_hint(self.run_dir)) from e

    def _build_parts(self, batch_size: int, fresh: bool) -> None:
        """Loaders, optimiser, schedule, scaler, training step and generators (engine/factory.py)."""
        cfg, dev, dist = self.cfg, self.dev, self.dist
        self.n_train = len(self.prepared.train.labels)
        self.n_val = len(self.prepared.val.labels) if self.prepared.val is not None else 0
        self.train_loader, self.val_loader = create_loaders(cfg, self.prepared, dev, batch_size, dist.rank,
                                                            dist.world_size)
        self.steps_per_epoch = len(self.train_loader)
        self.optimizer = self.build_optimizer()
        self.scheduler = create_scheduler(self.optimizer, cfg, self.steps_per_epoch, cfg.epochs - self.first_epoch)
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.use_scaler = dev.type == "cuda" and dev.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.step_fn = create_step(dist.wrap(self.model, dev), cfg, self.prepared, dev)
        self.aug_gen, self.mix_gen = create_generators(dev)
        self.plan = self._plan_time() if cfg.time and fresh else None
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema else None

    # ----------------------------------------------------------------- the parts a subclass changes
    def prepare(self, cfg: TrainConfig, split_file: Path | None) -> Any:
        """Check, split and cache the data (:func:`prepare_data`); rank 0 runs it first."""
        return prepare_data(cfg, self.console, split_file=split_file)

    def build_model(self, num_classes: int) -> torch.nn.Module:
        """The model to train, on the device: ``cfg.model``, initialised from ``cfg.seed``."""
        return create_model(self.cfg, num_classes, self.prep.channels, self.dev)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """``cfg.optimizer`` over the parameters that train (``requires_grad``), at ``cfg.lr``."""
        return create_optimizer(self.model, self.cfg)

    def hold_out(self, prepared: Any) -> tuple[Any, Any]:
        """The data without the images held out to fit the temperature, and those images: a small
        slice of the training split chosen by the seed (``evaluate.calibration.calibration_slice``),
        the same on every rank and on ``--resume``."""
        from convlens.evaluate.calibration import calibration_slice

        train = prepared.train
        held = calibration_slice(train.labels, self.cfg.seed)
        if not len(held):
            return prepared, None
        keep = np.setdiff1d(np.arange(len(train.labels)), held)
        return replace(prepared, train=train.take(keep)), train.take(held, "calibration")

    def finish_inputs(self) -> dict[str, Any]:
        """:func:`finish_run`'s ``calibration``, ``train_features`` and ``training`` for this run:
        the held-out slice to fit the temperature on; features from the final model."""
        return {"calibration": self.calibration_set}

    def begin(self) -> None:
        """A fresh run's work before the loop (nothing here)."""

    def set_train_mode(self) -> None:
        """The model's mode while it trains (dropout and batch-norm statistics on)."""
        self.model.train()

    def extra_metrics(self) -> dict[str, Any]:
        """More entries for the bundle's metrics (none here)."""
        return {}

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("finished") and (self.run_dir / BUNDLE_NAME).is_file():
            raise CheckpointError(f"run {str(self.run_dir)!r} already finished ({state['epoch']} epochs) and has "
                                  f"its {BUNDLE_NAME}; start a new run instead")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch, self.skip_steps = int(state["epoch"]), int(state["step_in_epoch"])
        if state.get("finished"):  # interrupted while evaluating: only the evaluation is left
            self.start_epoch, self.skip_steps = self.cfg.epochs, 0
        if self.skip_steps:  # the sums so far count once: on rank 0 (they are summed over ranks)
            self.partial = dict(state["partial"]) if self.dist.is_main else _fresh_partial()
            self.mid_epoch_rng = state["rng"]
        best_file = self.ckpt_dir / BEST
        if self.best.get("epoch") is not None and best_file.is_file():
            saved = load_checkpoint(best_file)  # the weights eval_model had: the EMA's with --ema
            self.best_weights = saved["ema"]["module"] if self.ema is not None and "ema" in saved else saved["model"]
        where = f", step {self.skip_steps + 1}" if self.skip_steps else ""
        say(self.console, f"resuming {self.run_dir} at epoch {self.start_epoch + 1}{where}")

    def snapshot(self, epoch_done: int, step_in_epoch: int, finished: bool = False) -> dict[str, Any]:
        """Everything a checkpoint holds, as state_dicts and plain data."""
        return {
            "epoch": epoch_done, "step_in_epoch": step_in_epoch, "finished": finished,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_scaler else {},
            "rng": {**rng_state(), "aug": self.aug_gen.get_state(), "mix": self.mix_gen.get_state()},
            "config": to_dict(self.cfg), "classes": self.classes, "arch": self.model.arch,
            "preprocessing": self.prep.to_dict(), "history": self.history, "best": self.best,
            "partial": dict(self.partial),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def fit(self, on_step: Callable[[int, int], None] | None = None) -> RunResult:
        """Train the remaining epochs, then evaluate the best weights and write the bundle.

        A full disk stops the run with a :class:`DiskFullError` that says how to resume it; every
        file it had written before stays whole.
        """
        with self.disk_full_advice():
            return self._fit(on_step)

    def _fit(self, on_step: Callable[[int, int], None] | None) -> RunResult:
        cfg, dev = self.cfg, self.dev
        if self.start_epoch < cfg.epochs:
            say(self.console, f"training {cfg.model} on {self.n_train} images ({self.n_val} validation), "
                               f"{len(self.classes)} classes, {self.prep.size[0]}x{self.prep.size[1]}x{self.prep.channels}, "
                               f"{dev.device} {dev.precision}, {self.threads} threads"
                               + (f" x {self.dist.world_size} processes" if self.dist.enabled else ""))
        say(self.console, f"run folder: {self.run_dir}")
        stopped_early = False
        hooks = [on_step] if on_step is not None else []  # called after every step, in turn
        if self.plan is None and not self.start_epoch and not self.skip_steps and self.dist.is_main:
            hooks.append(budget.LongRunNotice(  # a long run without --time says so
                cfg.epochs, self.steps_per_epoch, self.n_val / (3.0 * cfg.val_every * max(1, self.n_train)),
                lambda m: say(self.console, f"[yellow]note:[/yellow] {m}")))
        # Under DDP, Ctrl-C (which torchrun passes on to every rank) stops all at once; the run
        # resumes from the last epoch's checkpoint.
        with _StopOnSigint(enabled=not self.dist.enabled) as stop:
            epoch = self.start_epoch
            while epoch < self.cfg.epochs:  # --time may refit the epochs after the first (_replan)
                self._train_epoch(epoch, stop, hooks)
                stopped_early = self._end_epoch(epoch)
                if stop.requested:
                    raise TrainingInterrupted(self.run_dir, self.ckpt_dir / LAST)
                if stopped_early:
                    say(self.console, f"early stopping: no improvement for {cfg.patience} epochs "
                                       f"(best epoch {self.best['epoch']})")
                    break
                epoch += 1
        tensorboard.close(self.tb)
        cfg = self.cfg

        self.dist.barrier()  # every rank has trained; rank 0 alone evaluates and writes
        if not self.dist.is_main:
            return RunResult(self.run_dir, None, history=self.history, stopped_early=stopped_early)
        from convlens.evaluate.plots import curves_png

        curves = curves_png(self.history)
        write_bytes(self.run_dir / "curves.png", curves)
        if self.best_weights is not None:
            self.eval_model.load_state_dict(self.best_weights)
        model = self.eval_model.to(memory_format=torch.contiguous_format).eval()
        inputs = self.finish_inputs()
        self.dist.finish_threads(cfg.threads)  # each of N ranks trained with 1/N of the cores: now rank 0 alone
        result = finish_run(model, cfg, self.prepared, self.run_dir, self.history, self.best, dev.device,
                            inputs.pop("curves", curves), self.console, extra=self.extra_metrics(), plan=self.plan,
                            **inputs)
        result.stopped_early = stopped_early
        if self.plan is not None:
            self.plan.used_s = time.perf_counter() - self.t0
            write_json(self.run_dir / "budget.json", self.plan.to_dict())
            say(self.console, f"time budget {budget.format_seconds(self.plan.budget_s)}: "
                               f"{self.plan.summary()} in {budget.format_seconds(self.plan.used_s)}")
            result.metrics["time_budget"] = self.plan.to_dict()
        return result

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, best-epoch selection and the bundle use: the EMA weights with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def measure_speed(self, size: tuple[int, int] | None = None, validation: bool = True) -> budget.Speed:
        """Seconds per training step (at ``size``, None = the full size) and per validation batch,
        measured on a throw-away copy of the model (:func:`budget.measure_speed`)."""
        from convlens.data.loader import to_model_input

        cfg, dev = self.cfg, self.dev

        def step(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            fn = copy.copy(self.step_fn)
            fn.model, fn.input_size = model, size
            return fn(batch[0], batch[1].to(dev.device), torch.Generator().manual_seed(0))[0]

        def validate(model: torch.nn.Module, batch: Any) -> None:
            with runtime.autocast(dev):
                model(to_model_input(batch[0].to(dev.device), self.prep, channels_last=cfg.channels_last))

        self.train_loader.set_epoch(0)
        return budget.measure_speed(self.model, self.optimizer, step, self.train_loader, validate,
                                    self.val_loader if validation else None)

    def probe_speed(self, views: int, val_every: int = 1) -> tuple[budget.Speed, float, float]:
        """``--time``: the speed measured on a few steps (:meth:`measure_speed`), and from it the
        seconds of an epoch (validating every ``val_every``-th) and of the final evaluation
        (``views`` passes over the validation set, after finish_run's bf16-against-fp32 check)."""
        speed = self.measure_speed()
        val_batches = len(self.val_loader) if self.val_loader is not None else 0
        check_batches = math.ceil(bf16_check_size(self.n_val, self.dev.device) / self.cfg.batch_size)
        return (speed, budget.epoch_seconds(speed, self.steps_per_epoch, val_batches / val_every),
                budget.finish_seconds(speed, val_batches, views, check_batches))

    def _plan_time(self) -> budget.Plan | None:
        """``--time``: measure the speed on a few steps, then fix the epochs and the schedule."""
        cfg = self.cfg
        speed, epoch_s, finish_s = self.probe_speed(2 if cfg.flip_average else 1, cfg.val_every)
        small_s = small_step_s = None  # progressive resizing: its epochs at the smaller size cost less (measured)
        if cfg.progressive > 0:
            small_step_s = self.measure_speed(progressive_side(cfg.image_size), validation=False).step_s
            small_s = epoch_s - self.steps_per_epoch * (speed.step_s - small_step_s)
        limit = parse_duration(cfg.time)
        spent = time.perf_counter() - self.t0
        times = (epoch_s, finish_s, spent, small_s, cfg.progressive)
        epochs = self.dist.broadcast(budget.plan_epochs(limit, spent, epoch_s, finish_s, small_s, cfg.progressive))
        first_small = small_step_s is not None and progressive_size(cfg.image_size, cfg.progressive, 0, epochs) is not None
        plan = budget.Plan(budget_s=limit, epochs=epochs, epoch_s=epoch_s, finish_s=finish_s, spent_before_s=spent,
                           estimate_s=budget.estimate_seconds(epochs, *times), small_epoch_s=small_s,
                           first_train_s=self.steps_per_epoch * (small_step_s if first_small else speed.step_s))
        self.set_epochs(epochs)
        say(self.console, f"time budget {budget.format_seconds(limit)}: {epochs} epochs of ~{epoch_s:.1f} s "
                           f"(estimated {budget.format_seconds(plan.estimate_s)} in all)")
        return plan

    def set_epochs(self, epochs: int) -> None:
        """``--time``'s number of epochs: the one change made to a resolved configuration (the
        schedule is rebuilt for the epochs after :attr:`first_epoch` and config.yaml follows)."""
        self.cfg = replace(self.cfg, epochs=epochs)
        self.scheduler = create_scheduler(self.optimizer, self.cfg, self.steps_per_epoch, epochs - self.first_epoch)
        if self.dist.is_main:
            write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))

    def _replan(self, first_train_s: float) -> None:
        """``--time``: refit the epochs to the first epoch's measured speed (the plan came from a few
        probe steps), rebuild the schedule for the new total at the step reached, and say so."""
        plan = self.plan
        new = None if plan is None else self.dist.broadcast(budget.replan(plan, first_train_s, self.cfg.progressive))
        if new is None or new.epochs == self.cfg.epochs:
            return
        self.plan = new
        self.set_epochs(new.epochs)
        self.scheduler.last_epoch = self.steps_per_epoch - 1  # one epoch of steps done: its next value
        self.scheduler.step()
        say(self.console, f"time budget: the first epoch took {new.first_epoch_ratio:.2f}x the estimate, so "
                           f"{new.epochs} epochs instead of {new.planned_epochs} "
                           f"(estimated {budget.format_seconds(new.estimate_s)} in all)")

    def _train_epoch(self, epoch: int, stop: _StopOnSigint, hooks: list[Callable[[int, int], None]]) -> None:
        cfg = self.cfg
        self.train_loader.set_epoch(epoch)
        if self.mid_epoch_rng is not None:  # resuming inside this epoch: continue its streams
            set_rng_state(self.mid_epoch_rng)
            self.aug_gen.set_state(self.mid_epoch_rng["aug"])
            self.mix_gen.set_state(self.mid_epoch_rng["mix"])
            self.mid_epoch_rng = None
        else:  # every stream is a function of (seed, epoch): resuming at a boundary is exact
            r = 3 * self.dist.rank  # each rank draws its own augmentations
            torch.manual_seed(epoch_seed(cfg.seed, epoch, 0 + r))
            self.aug_gen.manual_seed(epoch_seed(cfg.seed, epoch, 1 + r))
            self.mix_gen.manual_seed(epoch_seed(cfg.seed, epoch, 2 + r))
            self.partial = _fresh_partial()
        skip, self.skip_steps = self.skip_steps, 0
        self.step_fn.input_size = progressive_size(cfg.image_size, cfg.progressive, epoch, cfg.epochs)
        p = self.partial
        self.set_train_mode()
        t_start = time.perf_counter() - p["seconds"]
        self.governor.reset()
        columns = (TextColumn("[bold]epoch {task.fields[ep]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True, disable=not shows_progress(self.console)) as bar:
            task = bar.add_task("train", total=self.steps_per_epoch, completed=skip,
                                ep=f"{epoch + 1}/{cfg.epochs}", stats="")
            for step, (x, y) in enumerate(self.train_loader):
                if step < skip:  # the same order as before the interruption: skip what was done
                    continue
                self.governor.update()
                y = y.to(self.dev.device, non_blocking=True)
                loss, logits = self.step_fn(x, y, self.aug_gen, self.mix_gen)
                if not torch.isfinite(loss):
                    raise ConfigError(f"the training loss became {float(loss.detach())} at epoch {epoch + 1}; "
                                      f"lower the learning rate. Received: lr={cfg.lr}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                p["loss_sum"] += float(loss.detach()) * len(y)
                p["correct"] += correct_count(logits.detach().float(), y)
                p["seen"] += len(y)
                p["seconds"] = time.perf_counter() - t_start
                bar.update(task, advance=1, stats=(
                    f"loss {p['loss_sum'] / p['seen']:.4f} acc {p['correct'] / p['seen']:.3f} "
                    f"{p['seen'] / max(p['seconds'], 1e-9):.0f} img/s"))
                for hook in hooks:
                    hook(epoch, step)
                if stop.requested:
                    path = save_checkpoint(self.ckpt_dir / LAST, self.snapshot(epoch, step + 1))
                    raise TrainingInterrupted(self.run_dir, path)

    def _end_epoch(self, epoch: int) -> bool:
        """Validate, record, checkpoint and print one epoch; True when early stopping triggers."""
        if epoch == 0 and self.plan is not None:  # a planned run (never a resumed one)
            self._replan(self.partial["seconds"])
        cfg = self.cfg
        p = self.dist.sum_values(self.partial, ("loss_sum", "correct", "seen"))  # over all ranks
        t_validate = time.perf_counter()
        self.dist.sync_buffers(self.model)  # evaluate with the batch-norm statistics rank 0 saves
        # --val-every N: validate every Nth epoch and the last (validation is ~10% of an epoch).
        skip = self.val_loader is not None and (epoch + 1) % cfg.val_every != 0 and epoch + 1 != cfg.epochs
        val_loss, val_acc = (None, None) if skip else _validate(
            self.eval_model, self.val_loader, self.prep, self.dev, cfg.channels_last, len(self.classes),
            reduce=self.dist.sum)
        seconds = p["seconds"] + time.perf_counter() - t_validate
        seen = max(p["seen"], 1)
        row = {
            "epoch": epoch + 1, "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_loss": p["loss_sum"] / seen, "train_acc": p["correct"] / seen,
            "val_loss": val_loss, "val_acc": val_acc,
            "img_per_s": p["seen"] / max(p["seconds"], 1e-9), "seconds": seconds,
        }
        improved, stopped_early = self.record(row, validated=not skip)
        finished = stopped_early or epoch + 1 == cfg.epochs
        recent = [r["seconds"] for r in self.history[-3:]]
        left = f"  left {clock(float(np.mean(recent)) * (cfg.epochs - epoch - 1))}" if not finished else ""
        say(self.console,
             f"epoch {epoch + 1}/{cfg.epochs}  loss {_fmt(row['train_loss'])}  acc {_fmt(row['train_acc'])}  "
             f"val_loss {_fmt(val_loss)}  val_acc {_fmt(val_acc)}  {row['img_per_s']:.0f} img/s  "
             f"{seconds:.1f}s{left}" + ("  *" if improved else ""))
        return stopped_early

    def record(self, row: dict[str, Any], validated: bool = True) -> tuple[bool, bool]:
        """Add an epoch's row: history, TensorBoard, the best epoch, and on rank 0 the checkpoints
        and ``metrics.csv``. Returns (improved, early stopping triggered)."""
        cfg = self.cfg
        self.history.append(row)
        tensorboard.log_epoch(self.tb, row)
        improved = validated and is_better(row, self.best)
        if improved:
            self.best.update(epoch=row["epoch"], val_acc=row["val_acc"], val_loss=row["val_loss"],
                             train_loss=row["train_loss"], bad_epochs=0)
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.eval_model.state_dict().items()}
        elif validated:
            self.best["bad_epochs"] = int(self.best["bad_epochs"]) + 1
        stopped_early = cfg.patience > 0 and self.best["bad_epochs"] >= cfg.patience
        if self.dist.is_main:
            # last.pt is the commit point, written last: a write that fails (full disk) or a kill
            # before it leaves a run that resumes at the previous epoch and redoes this one exactly.
            finished = stopped_early or row["epoch"] == cfg.epochs
            data = checkpoint_bytes(self.snapshot(row["epoch"], 0, finished=finished))
            write_metrics_csv(self.run_dir / "metrics.csv", self.history)
            if improved:
                save_checkpoint(self.ckpt_dir / BEST, data)
            save_checkpoint(self.ckpt_dir / LAST, data)
        return improved, stopped_early


def _fresh_partial() -> dict[str, Any]:
    """Running sums of the current epoch (saved in mid-epoch checkpoints)."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
