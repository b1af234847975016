"""The embedded default dataset: scikit-learn's 1,797 handwritten digits (8x8 grayscale) written
once as a class-folder dataset, so ``convlens train`` works with no data and no network."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from convlens.errors import DataError, DiskFullError
from convlens.files import disk_full_as_error

MARKER = ".convlens-digits-complete"


def ensure_digits_dataset(root: str | os.PathLike[str] | None = None) -> Path:
    """Return a folder ``root/<0..9>/digit_NNNN.png``, writing it first if needed.

    The files are written into a temporary sibling folder that is renamed into place at the
    end, so a kill never leaves half a dataset; concurrent callers are safe.
    """
    if root is None:
        from convlens.data.cache import default_cache_dir

        root = default_cache_dir() / "datasets" / "digits"
    root = Path(root).expanduser()
    if (root / MARKER).is_file():
        return root
    if root.exists():
        if not root.is_dir() or any(root.iterdir()):
            raise DataError(f"folder exists but is not a convlens digits dataset; remove it or pick another. Received: {str(root)!r}")
        root.rmdir()  # an empty folder we may replace
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        # 0..16 intensities -> 0..255 (exact multiples of 255/16, rounded).
        pixels = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
        with disk_full_as_error(root):  # about 1 MB
            for i, (img, label) in enumerate(zip(pixels, digits.target, strict=True)):
                d = tmp / str(int(label))
                d.mkdir(exist_ok=True)
                Image.fromarray(img, "L").save(d / f"digit_{i:04d}.png")  # tmp is renamed whole below
            (tmp / MARKER).write_text(f"{len(pixels)} images from sklearn.datasets.load_digits\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / MARKER).is_file():  # lost a race to another process: theirs is complete
                raise
    except DiskFullError as e:
        raise e.with_hint("free some space, or put the cache (where the digits go) on a disk with room: "
                          "CONVLENS_CACHE_DIR=DIR") from e
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                shutil.rmtree(tmp)  # only our own temporary folder
    return root
