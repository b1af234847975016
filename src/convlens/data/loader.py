"""Batches straight from the decode-once cache, and uint8 -> model input on the device.

No decoding happens here: a batch is a read of memory-mapped uint8 rows (airbench-style), so an
epoch costs a memory copy, not thousands of JPEG decodes. Sharding follows
``torch.utils.data.DistributedSampler``: one permutation per epoch from ``seed + epoch``,
padded so every rank takes the same number of steps, rank ``r`` taking every ``world_size``-th
index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from convlens.data.preprocess import Preprocessing
from convlens.errors import ConfigError


class BatchLoader:
    """Iterate ``(x uint8 N x H x W x C, y int64 N)`` CPU tensors over a subset.

    ``subset`` needs ``images`` (array-like, indexable by an index array) and ``labels``.
    ``even=True`` (default, what DDP training needs) pads the shards to equal length by
    repeating indices; ``even=False`` gives disjoint shards that cover every index exactly once
    (for evaluation).
    """

    def __init__(self, subset: Any, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, *, even: bool = True, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size). Received: rank={rank}, world_size={world_size}")
        self.images = subset.images
        self.labels = np.asarray(subset.labels, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.even, self.pin_memory = even, pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's permutation (the same on every rank, different every epoch)."""
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in visiting order."""
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n)
        if self.world_size == 1:
            return order
        if self.even and n:
            total = math.ceil(n / self.world_size) * self.world_size
            order = np.concatenate([order, np.resize(order, total - n)]) if total > n else order
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        n, ws = len(self.labels), self.world_size
        if ws > 1:
            n = math.ceil(n / ws) if self.even else len(range(self.rank, n, ws))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        stop = (len(idx) // self.batch_size) * self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            # Sorted rows read the memory map front to back; order within a batch is irrelevant.
            b = np.sort(idx[start:start + self.batch_size])
            x = torch.from_numpy(np.ascontiguousarray(self.images[b]))
            y = torch.from_numpy(self.labels[b])
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y


def _layout(x: torch.Tensor, channels: int) -> str:
    """``nhwc`` or ``nchw`` for a 4-D batch (uint8 defaults to NHWC, float to NCHW if ambiguous)."""
    last, second = x.shape[-1] == channels, x.shape[1] == channels
    if last and not second:
        return "nhwc"
    if second and not last:
        return "nchw"
    if last and second:
        return "nhwc" if x.dtype == torch.uint8 else "nchw"
    raise ConfigError(f"batch must have {channels} channels (NHWC or NCHW). Received: shape={tuple(x.shape)}")


def to_model_input(x: torch.Tensor | np.ndarray, prep: Preprocessing, channels_last: bool = True,
                   low_precision: torch.dtype | None = None) -> torch.Tensor:
    """uint8 (or 0-255 float) NHWC/NCHW batch -> float32 NCHW ``(x * scale - mean) / std``.

    A batch at the preprocessing's ``decode_size`` is centre-cropped to its ``size`` first.

    The torch twin of :meth:`Preprocessing.normalize`. ``channels_last`` returns the tensor in
    ``torch.channels_last`` memory format (faster convolutions on CPU and GPU). ``low_precision``
    (the autocast dtype the model will run in) returns uint8 input in that dtype instead when the
    preprocessing keeps pixels as integers, which bf16 and fp16 hold exactly: the same values
    autocast would make, in one pass instead of three (a copy, the exactness check, the cast).
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ConfigError(f"batch must be 4-D (N, H, W, C) or (N, C, H, W). Received: shape={tuple(x.shape)}")
    if _layout(x, prep.channels) == "nchw":
        x = x.permute(0, 2, 3, 1)  # work in NHWC: per-channel constants broadcast on the last axis
    x = prep.center_crop(x)  # a batch at decode_size (evaluation): its centre crop is the input
    if x.dtype == torch.uint8 and low_precision in (torch.bfloat16, torch.float16) and prep.integer_valued:
        y = x.to(low_precision, memory_format=torch.contiguous_format)  # exact: nothing to scale
    else:
        # Convert the contiguous NHWC block in one pass, then scale in place: 3-5x faster than
        # converting a permuted view. copy=True: a float input (e.g. the augmenter's output)
        # must not be scaled in place.
        y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        _normalize_(y, prep)
    y = y.permute(0, 3, 1, 2)  # the NCHW permute of NHWC memory *is* channels_last
    return y if channels_last else y.contiguous()


def _normalize_(y: torch.Tensor, prep: Preprocessing) -> None:
    """``(y * scale - mean) / std`` in place on a float NHWC tensor."""
    if all(m == 0.0 for m in prep.mean) and all(s == 1.0 for s in prep.std):
        y.mul_(prep.scale)
        return
    # (x * scale - mean) / std == x * (scale / std) - mean / std, in two passes, not three.
    c = prep.channels
    mean = np.broadcast_to(np.asarray(prep.mean, dtype=np.float64), (c,))
    std = np.broadcast_to(np.asarray(prep.std, dtype=np.float64), (c,))
    y.mul_(torch.tensor(prep.scale / std, dtype=torch.float32, device=y.device))
    y.sub_(torch.tensor(mean / std, dtype=torch.float32, device=y.device))
