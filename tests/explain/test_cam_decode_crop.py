"""CAM over the original photo for a bundle whose input is the centre crop of a larger decode."""

from __future__ import annotations

import pytest
import torch

from convlens.data.preprocess import Preprocessing
from convlens.explain.cam import input_window, upsample_to_original


@pytest.mark.parametrize("resize,orig,inp", [
    ("squash", (16.0, 8.0, 272.0, 136.0), (0, 0, 128, 128)),   # 288x144 squashed to 144, crop 8 px in
    ("crop", (80.0, 8.0, 208.0, 136.0), (0, 0, 128, 128)),     # the centre square, then its crop
    ("pad", (16.0, 0.0, 272.0, 144.0), (0, 28, 128, 100)),     # letterbox rows 36..108 inside the crop
])
def test_window_of_the_centre_crop(resize: str, orig: tuple, inp: tuple) -> None:
    prep = Preprocessing(size=(128, 128), decode_size=(144, 144), resize=resize)
    got_orig, got_in = input_window(prep, 288, 144)
    assert got_in == inp
    assert got_orig == pytest.approx(orig)


def test_map_covers_only_what_the_model_saw() -> None:
    prep = Preprocessing(size=(128, 128), decode_size=(144, 144))
    heat = upsample_to_original(torch.ones(8, 8), prep, 288, 144)
    assert heat.shape == (144, 288)
    assert float(heat[8:136, 16:272].min()) == pytest.approx(1.0)
    assert float(heat.sum()) == pytest.approx(128 * 256)  # zero outside the crop
