"""Resuming a run: which settings may change, and the saved configuration with the allowed changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convlens.config import TrainConfig, build, to_dict, validate_train_config
from convlens.engine.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
)
from convlens.errors import ConfigError

# Fields that do not change the result; everything else must match to resume a run.
RESUME_MUTABLE = {"epochs", "time", "patience", "device", "precision", "threads", "workers", "cache_dir", "nproc",
                  "project", "name", "exist_ok", "channels_last", "preset", "tensorboard"}


def check_resumable(cfg: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """A :class:`CheckpointError` when ``cfg`` changes a setting the run at ``path`` was trained with."""
    saved = state.get("config") or {}
    for key, value in to_dict(cfg).items():
        if key in RESUME_MUTABLE or key not in saved or (key == "data" and value is None):
            continue
        if saved[key] != value:
            raise CheckpointError(f"cannot change {key} when resuming {str(path)!r} "
                                  f"(run: {saved[key]!r}). Received: {key}={value!r}")


# Fine-tuning keys a run saved before they existed trained with these (the last quarter of the
# units at one rate): a resumed run keeps its own recipe, and its optimizer state still fits.
LEGACY_FINETUNE = {"finetune_units": 0.25, "finetune_lr_decay": 1.0}


def resume_config(resume: str | Path, overrides: dict[str, Any] | None) -> TrainConfig:
    """The saved configuration of a run, with the resume-safe ``overrides`` applied."""
    state = load_checkpoint(resolve_checkpoint(resume))
    saved = {k: v for k, v in (state.get("config") or {}).items()}
    if "finetune_units" not in saved:
        saved = {**LEGACY_FINETUNE, **saved}
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in RESUME_MUTABLE and k in saved:
            cur = build(TrainConfig, {k: value})
            if getattr(cur, k) != saved[k]:
                raise ConfigError(f"cannot change {k} when resuming; only {', '.join(sorted(RESUME_MUTABLE))} "
                                  f"may change. Received: {k}={value!r}")
    cfg = build(TrainConfig, saved, {k: v for k, v in overrides.items() if k.replace('-', '_') in RESUME_MUTABLE})
    validate_train_config(cfg)
    return cfg


def open_run(resume: str | Path, cfg: TrainConfig, is_main: bool = True) -> tuple[dict[str, Any], Path, Path | None]:
    """The checkpoint state of the run to resume, its run folder, and its ``split.csv`` (None if absent).

    Checks that ``cfg`` may resume it; ``is_main``: this process removes stale temporary files.
    """
    ckpt_path = resolve_checkpoint(resume)
    state = load_checkpoint(ckpt_path)
    check_resumable(cfg, state, ckpt_path)
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == CHECKPOINT_DIR else ckpt_path.parent
    if is_main:
        remove_stale_temporaries(ckpt_path.parent)
    # The run's own split, even if files were added to the folder since.
    split_file = run_dir / "split.csv" if (run_dir / "split.csv").is_file() else None
    return state, run_dir, split_file
