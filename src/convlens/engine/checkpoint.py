"""Training checkpoints: state_dicts and plain data only, written atomically, loaded safely.

A checkpoint never holds a pickled module or object: model, optimizer, scheduler and scaler
state_dicts, RNG states as tensors and lists, the resolved config as a dict. It is written
with ``torch.save`` to a temporary file that is renamed over the old one (``convlens.files``),
so a kill -9 or a full disk at any moment leaves the previous checkpoint or the new one, never
half a file, and it is read back with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.errors import UserError, first_line
from convlens.files import write_bytes

FORMAT = "convlens-checkpoint"
FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be resumed from."""


def disk_full_hint(run_dir: str | os.PathLike[str]) -> str:
    """What to do when the disk under a run folder fills: resume once it has a checkpoint, else
    start again with the run folders elsewhere."""
    if (Path(run_dir) / CHECKPOINT_DIR / LAST).is_file():
        return f"free some space, then continue with: convlens train --resume {run_dir}"
    return "free some space, or put the run folders on a disk with room: --project DIR"


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """Serialise ``state`` with ``torch.save`` (to bytes, so one state can go to two files)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any] | bytes) -> Path:
    """Atomically write a checkpoint (a state dict, or bytes from :func:`checkpoint_bytes`)."""
    write_bytes(path, state if isinstance(state, bytes) else checkpoint_bytes(state))
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` if unusable."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist; pass a run folder with checkpoints/{LAST}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain data: never unpickle objects.
        raise CheckpointError(f"checkpoint {str(p)!r} holds objects that are not plain data; refusing to load it") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        why = first_line(e, None)
        raise CheckpointError(f"checkpoint {str(p)!r} is damaged or truncated ({why})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a convlens checkpoint")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(p)!r} was written by a newer convlens; upgrade convlens")
    return state


def resolve_checkpoint(run: str | os.PathLike[str]) -> Path:
    """``runs/<name>`` (or its ``checkpoints/`` folder, or a ``.pt`` file) -> the last checkpoint."""
    p = Path(run)
    if p.is_file():
        return p
    for candidate in (p / CHECKPOINT_DIR / LAST, p / LAST):
        if candidate.is_file():
            return candidate
    if not p.exists():
        raise CheckpointError(f"run folder {str(p)!r} does not exist. Received: --resume {str(run)!r}")
    raise CheckpointError(f"{str(p)!r} has no {CHECKPOINT_DIR}/{LAST} to resume from; was it started with `convlens train`?")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete ``.last.pt.*.tmp`` leftovers of a write that a kill -9 interrupted."""
    n = 0
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The global RNG states of torch, CUDA, numpy and Python as tensors and plain data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],  # tuples as lists
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
