"""``convlens train --tensorboard``: the per-epoch metrics as TensorBoard event files in the run folder.

TensorBoard is an optional dependency (``pip install 'convlens[tensorboard]'``); asking for it
without the package is a one-line error before any data is decoded. ``tensorboard --logdir runs``
then shows every run's curves.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from convlens.errors import ConfigError

# metrics.csv column -> TensorBoard tag (train and validation side by side in one section each).
TAGS = {"train_loss": "loss/train", "val_loss": "loss/validation", "train_acc": "accuracy/train",
        "val_acc": "accuracy/validation", "lr": "learning_rate", "img_per_s": "speed/img_per_s"}


def require() -> None:
    """Raise a one-line :class:`ConfigError` when the ``tensorboard`` package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'convlens[tensorboard]' "
                          "(or pip install tensorboard). Received: tensorboard=True")


def open_writer(run_dir: Path, first_epoch: int = 0) -> Any:
    """A ``SummaryWriter`` on ``run_dir``; on resume, events after ``first_epoch`` are replaced."""
    require()
    # Scalars need no TensorFlow; without this marker module tensorboard imports a TensorFlow it
    # finds installed (seconds, and log noise) just to write event files.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir), purge_step=first_epoch + 1 if first_epoch else None)


def log_epoch(writer: Any, row: dict[str, Any]) -> None:
    """Write one ``metrics.csv`` row (``epoch`` is the step); a ``None`` writer does nothing."""
    if writer is None:
        return
    for key, tag in TAGS.items():
        value = row.get(key)
        if value is not None:
            writer.add_scalar(tag, float(value), int(row["epoch"]))
    writer.flush()


def close(writer: Any) -> None:
    """Flush and close a writer from :func:`open_writer` (``None``: nothing to do)."""
    if writer is not None:
        writer.close()
