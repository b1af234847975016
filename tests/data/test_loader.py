from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from convlens.data.loader import BatchLoader, to_model_input
from convlens.data.preprocess import Preprocessing
from convlens.errors import ConfigError


@dataclass
class _Subset:
    images: np.ndarray
    labels: np.ndarray


def _subset(n: int = 10) -> _Subset:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    return _Subset(images=images, labels=np.arange(n, dtype=np.int64))


def _seen(loader: BatchLoader) -> list[int]:
    out = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape[1:] == (4, 4, 3)
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # images and labels stay paired
        out += y.tolist()
    return out


def test_batches_cover_everything_in_order() -> None:
    loader = BatchLoader(_subset(10), batch_size=4, shuffle=False)
    assert len(loader) == 3
    assert _seen(loader) == list(range(10))
    dl = BatchLoader(_subset(10), batch_size=4, shuffle=False, drop_last=True)
    assert len(dl) == 2 and len(_seen(dl)) == 8


def test_shuffle_is_reproducible_per_epoch() -> None:
    a = BatchLoader(_subset(50), batch_size=50, shuffle=True, seed=3)
    b = BatchLoader(_subset(50), batch_size=50, shuffle=True, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a.indices()) == list(b.indices())
    first = list(a.indices())
    a.set_epoch(2)
    assert list(a.indices()) != first and sorted(a.indices()) == list(range(50))


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (7, 2), (5, 8)])
def test_sharding_covers_every_index_once(n: int, world: int) -> None:
    shards = []
    for rank in range(world):
        ld = BatchLoader(_subset(n), batch_size=2, shuffle=True, seed=1, rank=rank, world_size=world, even=False)
        ld.set_epoch(4)
        got = _seen(ld)
        assert len(ld) == -(-len(got) // 2)
        shards.append(got)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))
    # even (DDP training): equal lengths on every rank, every index at least once
    lens, seen = set(), set()
    for rank in range(world):
        ld = BatchLoader(_subset(n), batch_size=2, shuffle=True, seed=1, rank=rank, world_size=world)
        ld.set_epoch(4)
        idx = ld.indices()
        lens.add(len(idx))
        seen |= set(idx.tolist())
        assert len(ld) == -(-len(idx) // 2)
    assert len(lens) == 1 and seen == set(range(n))


def test_bad_rank() -> None:
    with pytest.raises(ConfigError):
        BatchLoader(_subset(), 2, False, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        BatchLoader(_subset(), 0, False)


def test_integer_pixels_go_straight_to_the_autocast_dtype() -> None:
    """The tutorial's 0-255 input is exact in bf16/fp16: uint8 becomes it in one pass; any other
    scale (or float input, e.g. rotated pixels) stays float32 for the first convolution."""
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8))
    tut = Preprocessing(size=(5, 6), scale=1.0)
    assert tut.integer_valued and not Preprocessing(size=(5, 6)).integer_valued
    assert not Preprocessing(size=(5, 6), scale=1.0, mean=(1.0,)).integer_valued
    want = to_model_input(batch, tut)
    for low in (torch.bfloat16, torch.float16):
        got = to_model_input(batch, tut, low_precision=low)
        assert got.dtype == low and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.float(), want)
    assert to_model_input(batch, Preprocessing(size=(5, 6)), low_precision=torch.bfloat16).dtype == torch.float32
    assert to_model_input(batch.float(), tut, low_precision=torch.bfloat16).dtype == torch.float32


def test_to_model_input_matches_numpy_normalize() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, 5, 6, 3), dtype=np.uint8)
    prep = Preprocessing(size=(5, 6), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    want = prep.normalize(batch)
    got = to_model_input(torch.from_numpy(batch), prep)
    assert got.dtype == torch.float32 and got.shape == (3, 3, 5, 6)
    assert got.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    # float NCHW input (after augmentation) gives the same
    # float NCHW in channels_last memory, as the augmenter returns it
    f = torch.from_numpy(batch).float().permute(0, 3, 1, 2)
    f_before = f.clone()
    np.testing.assert_allclose(to_model_input(f, prep, channels_last=False).numpy(), want, rtol=1e-5, atol=1e-5)
    assert to_model_input(f, prep, channels_last=False).is_contiguous()
    assert torch.equal(f, f_before), "the input batch must not be modified"
    tut = Preprocessing(size=(5, 6), scale=1.0)
    np.testing.assert_array_equal(to_model_input(batch, tut).numpy(), batch.transpose(0, 3, 1, 2).astype(np.float32))
    gray = Preprocessing(size=(5, 6), channels=1)
    assert to_model_input(batch[..., :1], gray).shape == (3, 1, 5, 6)
    with pytest.raises(ConfigError):
        to_model_input(batch[..., :2], prep)
