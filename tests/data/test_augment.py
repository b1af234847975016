from __future__ import annotations

import numpy as np
import pytest
import torch

from convlens.data.augment import build_augmentation, mix_batch
from convlens.errors import ConfigError


def _batch(n: int = 8, size: int = 16, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, c), generator=g, dtype=torch.uint8)


def test_reproducible_with_a_seed_and_global_rng_untouched() -> None:
    aug = build_augmentation(flip=True, rotation=0.1, crop_scale=0.5, color_jitter=0.3, erasing=0.5, image_size=16)
    x = _batch()
    state = torch.random.get_rng_state()
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    c = aug(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (8, 3, 16, 16)
    assert float(a.min()) >= 0 and float(a.max()) <= 255


def test_rotation_is_a_fraction_of_a_turn_and_bounded() -> None:
    aug = build_augmentation(flip=False, rotation=0.1, image_size=16)
    assert aug.degrees == pytest.approx(36.0)
    angles = []
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        aug(_batch(16), generator=g)
        angles.append(aug.rotate._params["angle"].abs())
    angles = torch.cat(angles)
    assert float(angles.max()) <= 36.0 + 1e-4 and float(angles.max()) > 30.0  # uses the whole range


def test_rotation_really_rotates() -> None:
    # A bright vertical bar: after augmentation its principal axis is tilted by the drawn angle.
    x = torch.zeros(1, 41, 41, 1, dtype=torch.uint8)
    x[0, 6:35, 20, 0] = 255
    aug = build_augmentation(flip=False, rotation=0.1, image_size=41)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        out = aug(x, generator=g)[0, 0].numpy()
        theta = float(aug.rotate._params["angle"][0])
        if abs(theta) > 15:
            break
    ys, xs = np.nonzero(out > 64)
    w = out[ys, xs]
    cx, cy = np.average(xs, weights=w), np.average(ys, weights=w)
    cov = np.cov(np.stack([xs - cx, ys - cy]), aweights=w)
    evals, evecs = np.linalg.eigh(cov)
    vx, vy = evecs[:, -1]
    tilt = np.degrees(np.arctan2(abs(vx), abs(vy)))  # 0 for a vertical bar
    assert abs(tilt - abs(theta)) < 4, (tilt, theta)


def test_flip_only_gives_the_image_or_its_mirror() -> None:
    aug = build_augmentation(flip=True, image_size=16)
    x = _batch(32)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    ref = x.permute(0, 3, 1, 2).float()
    same = (out == ref).flatten(1).all(1)
    mirrored = (out == ref.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 5 < int(mirrored.sum()) < 27


def test_grayscale_and_crop_output_size() -> None:
    aug = build_augmentation(flip=False, crop_scale=0.3, color_jitter=0.4, image_size=(12, 10))
    out = aug(_batch(4, 16, 1), generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 12, 10)


def test_off_and_bad_values() -> None:
    assert build_augmentation(flip=False) is None
    for kw in ({"rotation": 0.8}, {"crop_scale": 0.0}, {"erasing": 2.0}, {"color_jitter": -1}):
        with pytest.raises(ConfigError, match="Received"):
            build_augmentation(**kw)
    aug = build_augmentation(flip=True, image_size=4)
    with pytest.raises(ConfigError):
        aug(torch.zeros(2, 4, 4, 3))


def test_mixup_and_cutmix() -> None:
    x = torch.rand(8, 3, 16, 16)
    y = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    assert mix_batch(x, y, 0, 0) == (x, y)
    xm, ym = mix_batch(x, y, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ym.sum(1), torch.ones(8))
    xm2, ym2 = mix_batch(x, y, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    # cutmix: targets weighted by the pasted area exactly
    xc, yc = mix_batch(x, y, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(3))
    changed = (xc != x).any(1)  # N x H x W pixels taken from another image
    own = yc[torch.arange(8), torch.arange(8) % 4]
    for i in range(8):
        if own[i] < 1:
            frac = changed[i].float().mean()
            # pixels copied from a same-class image may be unchanged, so compare with <=
            assert frac <= 1 - own[i] + 1e-6
    with pytest.raises(ConfigError):
        mix_batch(x, torch.arange(8), mixup_alpha=0.2)
