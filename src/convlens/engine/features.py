"""Frozen pretrained features: one ``(N, C)`` float32 row per image, computed once and cached.

A feature is the global average of a pretrained backbone's last feature map (what its dense head
reads), for uint8 images decoded at the backbone's own preprocessing. Rows are cached on disk next
to the decode cache of the same dataset::

    <cache>/<dataset-key>/feat-<key>/index.json       file content hash -> row, and the array's name
    <cache>/<dataset-key>/feat-<key>/features-<id>.npy  float32 N x C

``<key>`` covers everything the numbers depend on: the backbone (architecture and weight file
SHA-256), the pixel parameters, precision, flipping and the format version. Rows are found by
the image file's SHA-256, so a renamed file is not recomputed, a changed one is, and a second run
with another head, split or class layout costs a read. The index is written atomically after
the array, so an interrupted run leaves the previous cache usable. The space of the new array
is checked before the features are computed; a full disk is a one-line ``DiskFullError``.

Typical use (the data audit does this)::

    from convlens.engine.features import folder_features
    fs = folder_features("photos/")            # FeatureSet: features (N, 1280), labels, paths, classes
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens import files as cio
from convlens import runtime
from convlens.config import DEFAULT_BACKBONE
from convlens.data.cache import (
    CACHE_SPACE_HINT,
    CachedImages,
    cache_lock,
    dataset_cache_dir,
    default_cache_dir,
    open_array,
    params_key,
    pixel_params,
    read_json,
)
from convlens.data.loader import to_model_input
from convlens.data.prepare import prepare_dataset
from convlens.data.preprocess import Preprocessing
from convlens.engine.distributed import Dist
from convlens.errors import DiskFullError
from convlens.models.create import create_model
from convlens.models.model import ConvlensModel
from convlens.models.pretrained import PretrainedSource, PretrainedWeights, read_pretrained

FEATURES_VERSION = 2  # 2: rows of duplicate files were misaligned in version 1 caches


@dataclass
class Backbone:
    """A pretrained model (its head still to be fitted), its weights as read (once) with where
    they came from, and the preprocessing its weights expect."""

    model: ConvlensModel
    weights: PretrainedWeights
    preprocessing: Preprocessing

    @property
    def source(self) -> PretrainedSource:
        return self.weights.source

    def create(self, num_classes: int) -> ConvlensModel:
        """A fresh model of this backbone for ``num_classes`` (the weights are not read again)."""
        return create_model(self.source.arch, num_classes, pretrained=self.weights)

    @property
    def num_features(self) -> int:
        return int(self.model.gap_linear_head().in_features)


def backbone_preprocessing(source: PretrainedSource, channels: int = 3, max_pixels: int | None = None) -> Preprocessing:
    """The :class:`Preprocessing` a backbone's weights were trained with."""
    spec = dict(source.spec)
    size = int(spec.pop("size"))
    extra = {"max_pixels": max_pixels} if max_pixels else {}
    return Preprocessing(size=(size, size), channels=channels, **spec, **extra)


def load_pretrained(pretrained: str = DEFAULT_BACKBONE, arch: str | None = None,
                    max_pixels: int | None = None) -> Backbone:
    """Read a packaged (``efficientnet_lite0``) or local (path) backbone once."""
    weights = read_pretrained(pretrained, arch)
    model = create_model(weights.source.arch, 2, pretrained=weights)  # features only: the head is unused
    return Backbone(model.eval(), weights, backbone_preprocessing(weights.source, max_pixels=max_pixels))


def extract_features(model: ConvlensModel, images: Any, prep: Preprocessing, *, batch_size: int = 64,
                     precision: str = "bf16", flip: bool = False, device: str = "cpu",
                     progress: Any = None) -> np.ndarray:
    """Pooled features ``(N, C)`` float32 of uint8 ``N x H x W x C`` images (array or cache rows).

    ``precision`` ``bf16`` runs under autocast where the device supports it (1.7x faster on
    AVX-512 CPUs), else fp32. ``flip`` mirrors every image first. ``progress(done)`` is called
    after each batch.
    """
    dev = runtime.resolve_device(device, precision)
    # Moved outside inference mode: the parameters stay ordinary tensors (fine-tuning may follow).
    model = model.eval().to(dev.device, memory_format=torch.channels_last)
    n = len(images)
    out = np.zeros((n, int(model.gap_linear_head().in_features)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(dev.device)
            if flip:
                x = x.flip(2)  # NHWC: the width axis
            x = to_model_input(x, prep, channels_last=True)
            if prep.channels == 1 and model.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)  # grayscale into an RGB backbone: replicate the channel
            with runtime.autocast(dev):
                f = model.forward_features(x)
            out[start:start + len(x)] = f.float().mean(dim=(2, 3)).cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, n))
    return out


def feature_speed(backbone: Backbone, images: int = 16) -> float:
    """Images per second of ``backbone``'s bf16 feature pass, timed on a batch of ``images``
    random images at its own size after an untimed one of the same shape (the first call of a
    shape sets up its kernels): what ``--time`` plans with."""
    side_h, side_w = backbone.preprocessing.size
    batch = np.random.default_rng(0).integers(0, 256, (images, side_h, side_w, 3), dtype=np.uint8)
    extract_features(backbone.model, batch, backbone.preprocessing, batch_size=images)
    t = time.perf_counter()
    extract_features(backbone.model, batch, backbone.preprocessing, batch_size=images)
    return images / max(time.perf_counter() - t, 1e-9)


def feature_params(source: PretrainedSource, prep: Preprocessing, precision: str, flip: bool) -> dict[str, Any]:
    """What cached features depend on (their cache key)."""
    return {"version": FEATURES_VERSION, "arch": source.arch, "weights_sha256": source.sha256,
            "pixels": pixel_params(prep), "scale": prep.scale, "mean": list(prep.mean), "std": list(prep.std),
            "precision": precision, "flip": bool(flip), "torch": torch.__version__.split("+")[0]}


def cached_features(backbone: Backbone, images: Any, hashes: Sequence[str], dataset_root: str | Path, *,
                    prep: Preprocessing | None = None, cache_dir: str | Path | None = None,
                    precision: str = "bf16", flip: bool = False, batch_size: int = 64,
                    progress: Any = None, dist: Dist | None = None) -> np.ndarray:
    """Features of ``images`` (uint8 rows whose files have SHA-256 ``hashes``), from the on-disk
    cache of ``dataset_root`` where present; the missing rows are computed and added.

    ``dist``: the processes of a distributed job, every one calling this with the same images
    (a collective): each computes its share of the rows missing from any machine's cache, every
    process gets them all (gathered over the process group: no folder need be shared), and each
    machine's first process adds them to its cache.
    """
    dist = dist or Dist()
    prep = prep or backbone.preprocessing
    root = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir().resolve()
    key = params_key(feature_params(backbone.source, prep, precision, flip))
    fdir = dataset_cache_dir(root, Path(dataset_root).resolve()) / f"feat-{key}"
    old_rows, old_array = _read_cache(fdir)
    # One computation per distinct file content (duplicate files share a row).
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}
    missing = [h for h in dict.fromkeys(hashes) if h not in old_rows]  # old_rows is {} without an array
    if dist.enabled:
        missing = _missing_anywhere(dist, hashes, missing)
    share = dist.share(len(missing))
    fresh = np.zeros((0, backbone.num_features), np.float32)
    if missing:
        # Before minutes of computing: the new array holds the old rows and the new ones. Every
        # process checks (the same answer on one machine), so none waits for one that stopped.
        n = len(old_rows) + len(missing)
        cio.ensure_space(fdir, n * backbone.num_features * 4 + 4096,
                         f"the feature cache ({n} x {backbone.num_features} floats)", hint=CACHE_SPACE_HINT)
        if missing[share]:
            rows = CachedImages(images, [first[h] for h in missing[share]])  # lazy: read a batch at a time
            fresh = extract_features(backbone.model, rows, prep,
                                     batch_size=batch_size, precision=precision, flip=flip, progress=progress)
        fresh = dist.gather_rows(fresh, len(missing))
    out = np.zeros((len(hashes), backbone.num_features), np.float32)
    new_of = {h: k for k, h in enumerate(missing)}  # hash -> row of fresh, in fresh's order
    for i, h in enumerate(hashes):
        out[i] = fresh[new_of[h]] if h in new_of else old_array[old_rows[h]]  # type: ignore[index]
    if missing and dist.local_rank == 0:
        _write_cache(fdir, new_of, fresh)
    return out


def _read_cache(fdir: Path) -> tuple[dict[str, int], np.ndarray | None]:
    """(file hash -> row, the memory-mapped rows) of a feature cache folder; ({}, None) when empty."""
    index = read_json(fdir / "index.json")
    if not index:
        return {}, None
    # Only a whole array is read: a damaged or truncated one (a full disk earlier) is computed again.
    array = open_array(fdir / str(index.get("array")), index.get("shape"), np.float32)
    return (dict(index.get("rows", {})), array) if array is not None else ({}, None)


def _missing_anywhere(dist: Dist, hashes: Sequence[str], missing: list[str]) -> list[str]:
    """The rows some process's cache lacks, in ``hashes``' order: the same list on every rank
    (machines that do not share a cache folder may hold different rows)."""
    everyone = dist.gather(missing)
    if all(m == missing for m in everyone):
        return missing
    union = {h for m in everyone for h in m}
    return [h for h in dict.fromkeys(hashes) if h in union]


def _write_cache(fdir: Path, new_of: dict[str, int], fresh: np.ndarray) -> None:
    """The cache's rows + new rows into a new array, then the index (the commit point); best effort.

    Under the folder's lock, from the index as it is now: processes of several machines sharing
    one cache folder each add their rows without dropping another's.
    """
    try:
        with cache_lock(fdir):
            old_rows, old_array = _read_cache(fdir)
            new_of = {h: k for h, k in new_of.items() if h not in old_rows}
            if not new_of:
                return  # another process added them
            keep = {h: r for h, r in old_rows.items() if old_array is not None and r < len(old_array)}
            merged = np.concatenate([old_array[list(keep.values())] if keep else fresh[:0],  # type: ignore[index]
                                     fresh[list(new_of.values())]])
            rows = {h: i for i, h in enumerate([*keep, *new_of])}
            name = f"features-{uuid.uuid4().hex[:12]}.npy"
            buf = io.BytesIO()
            np.save(buf, merged)
            cio.write_bytes(fdir / name, buf.getvalue())
            cio.write_json(fdir / "index.json", {"array": name, "shape": list(merged.shape), "rows": rows})
            for p in fdir.glob("features-*.npy"):
                if p.name != name:
                    with contextlib.suppress(OSError):
                        p.unlink()  # our own superseded arrays
    except DiskFullError as e:
        raise e.with_hint(CACHE_SPACE_HINT) from e
    except OSError:
        pass  # a read-only cache folder: the features were computed and are returned anyway


@dataclass
class FeatureSet:
    """Features of every usable image of a class-folder dataset, with labels and paths."""

    features: np.ndarray  # float32 N x C
    labels: np.ndarray  # int64 N
    paths: list[str]  # relative to root
    subsets: list[str]  # train / val / test, as training would split them
    classes: list[str]
    root: Path
    preprocessing: Preprocessing
    source: PretrainedSource
    skipped: list[Any] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def subset_hashes(prepared: Any, paths: Sequence[str]) -> list[str]:
    """The file SHA-256 of each relative path of a prepared dataset (the feature cache's row key)."""
    return [prepared.cache.records[p].sha256 for p in paths]


def folder_features(root: str | Path, pretrained: str = DEFAULT_BACKBONE, *, arch: str | None = None,
                    cache_dir: str | Path | None = None, workers: int = 0, precision: str = "bf16",
                    flip: bool = False, progress: bool = False, val_fraction: float = 0.2,
                    seed: int = 1337) -> FeatureSet:
    """Decode (cached) and featurise (cached) every usable image under ``root``.

    ``subsets`` tells which images training with the same ``val_fraction``/``seed`` would hold
    out; the features of all are returned.
    """
    backbone = load_pretrained(pretrained, arch)
    p = backbone.preprocessing
    t0 = time.perf_counter()
    prepared = prepare_dataset(root, p, val_fraction=val_fraction, seed=seed, cache_dir=cache_dir,
                               workers=workers, progress=progress)
    t1 = time.perf_counter()
    parts = [s for s in (prepared.train, prepared.val, prepared.test) if s is not None and len(s)]
    paths = [q for s in parts for q in s.paths]
    rows = np.array([prepared.cache.rows[q] for q in paths], dtype=np.int64)
    images = CachedImages(prepared.cache.array, rows)
    feats = cached_features(backbone, images, subset_hashes(prepared, paths), prepared.root,
                            prep=prepared.preprocessing, cache_dir=cache_dir, precision=precision, flip=flip)
    return FeatureSet(features=feats, labels=np.concatenate([s.labels for s in parts]), paths=paths,
                      subsets=[s.name for s in parts for _ in s.paths], classes=list(prepared.classes),
                      root=prepared.root, preprocessing=prepared.preprocessing, source=backbone.source,
                      skipped=list(prepared.skipped),
                      seconds={"decode": t1 - t0, "features": time.perf_counter() - t1})
