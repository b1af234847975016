"""The one builder of test bundles (seeded registry or layer-list models, no trainer) and
synthetic images for the tests of every package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from convlens.data.preprocess import Preprocessing
from convlens.infer.bundle import BundleMeta, save_bundle

METRICS = {"val_accuracy": 0.75, "epochs": 1}


def make_model(name: str = "tiny", num_classes: int = 2, in_channels: int = 3, seed: int = 0,
               layers: list[dict[str, Any]] | None = None, size: int = 32, random_biases: bool = False,
               **kwargs: object) -> torch.nn.Module:
    """A freshly initialised (seeded) registry model, or a layer-list model when ``layers`` is given.

    ``random_biases`` makes every bias non-trivial, so a bias an export lost would show.
    """
    from convlens.models import build_from_spec, create

    torch.manual_seed(seed)
    if layers is not None:
        model = build_from_spec(layers, num_classes, in_channels, (size, size))
    else:
        model = create(name, num_classes, in_channels, **kwargs)
    if random_biases:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.uniform_(-0.5, 0.5)
    return model.eval()


def make_meta(model: torch.nn.Module, classes: Sequence[str], size: int = 32, channels: int = 3,
              resize: str = "squash", threshold: float = 0.5, **prep: object) -> BundleMeta:
    return BundleMeta(
        arch=model.arch, classes=list(classes),
        preprocessing=Preprocessing(size=(size, size), channels=channels, resize=resize, **prep),
        output_activation=model.output_activation, threshold=threshold, metrics=dict(METRICS),
    )


def make_bundle(path: Path, name: str = "tiny", classes: Sequence[str] = ("cats", "dogs"), size: int = 32,
                channels: int = 3, resize: str = "squash", seed: int = 0, model: torch.nn.Module | None = None,
                layers: list[dict[str, Any]] | None = None, random_biases: bool = False, **prep: object) -> Path:
    """Save a bundle of a freshly initialised model (or of ``model``) at ``path``."""
    if model is None:
        model = make_model(name, len(classes), channels, seed, layers=layers, size=size, random_biases=random_biases)
    return save_bundle(path, model, make_meta(model, classes, size, channels, resize, **prep))


def independent_probs(model: torch.nn.Module, prep: Preprocessing, path: str | Path) -> np.ndarray:
    """Preprocessing.load -> normalize -> model -> sigmoid/softmax, written out separately."""
    x = torch.from_numpy(prep.normalize(prep.load(path)[None]))
    with torch.no_grad():
        z = model(x).double()
    if z.shape[1] == 1:
        p1 = torch.sigmoid(z[:, 0])
        return torch.stack([1 - p1, p1], 1).numpy()
    return torch.softmax(z, 1).numpy()


def set_logit(model: torch.nn.Module, x: torch.Tensor, target: float) -> None:
    """Shift the dense bias of a one-unit model so that ``model(x) == target`` (a confident model)."""
    dense = model.gap_linear_head()
    with torch.no_grad():
        z = float(model(x)[0, 0])
        dense.bias += target - z


def write_images(folder: Path, n: int, *, seed: int = 0, size: tuple[int, int] = (40, 30),
                 fmt: str = "PNG", bright: bool | None = None) -> list[Path]:
    """``n`` random RGB images (optionally mostly bright or mostly dark) in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        lo, hi = (0, 256) if bright is None else ((140, 256) if bright else (0, 116))
        a = rng.integers(lo, hi, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(a).save(p, format=fmt)
        paths.append(p)
    return paths


def png_bytes(width: int = 24, height: int = 20, seed: int = 0) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pixel_bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's header).

    Built from a real 8x8 PNG by rewriting the IHDR size fields and their CRC, so the file is
    valid up to the point where a decoder would start allocating.
    """
    import struct
    import zlib

    data = bytearray(png_bytes(8, 8))
    # Signature (8 bytes), then the IHDR chunk: length (4), b"IHDR" (4), data (13), CRC (4).
    assert data[12:16] == b"IHDR"
    data[16:20] = struct.pack(">I", width)
    data[20:24] = struct.pack(">I", height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)



def write_flat_images(folder: Path, n: int, *, seed: int = 0, low: int = 140, high: int = 256,
                      size: tuple[int, int] = (40, 30)) -> list[Path]:
    """``n`` PNGs each of one random colour (channels in ``[low, high)``) plus mild noise: images
    that differ from each other (unlike uniform noise), for novelty and neighbour tests."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(low, high, size=3)
        a = np.clip(base + rng.normal(0, 8, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
        p = folder / f"img{i:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def make_novelty_bundle(path: Path, train_images: Sequence[Path], labels: Sequence[int],
                        val_images: Sequence[Path] | None = None, classes: Sequence[str] = ("cats", "dogs"),
                        size: int = 32, seed: int = 0, k: int = 3, accept: float = 0.95,
                        root: Path | None = None, model: torch.nn.Module | None = None) -> Path:
    """A bundle whose novelty index holds the pooled features of ``train_images`` (the model's
    own, through the prediction backend), with the threshold chosen on ``val_images`` (or
    leave-one-out on the training images); reference paths are relative to ``root``."""
    from convlens.infer import TorchBackend
    from convlens.infer.novelty import build_index

    if model is None:
        model = make_model("tiny", len(classes), 3, seed, size=size, random_biases=True)
    meta = make_meta(model, classes, size)
    backend = TorchBackend(model, "cpu", "fp32")

    def features(paths: Sequence[Path]) -> np.ndarray:
        images = np.stack([meta.preprocessing.load(p) for p in paths])
        return backend.image_outputs(images, meta.preprocessing)[1]

    names = [str(p.relative_to(root)) if root else p.name for p in train_images]
    index = build_index(features(train_images), np.asarray(labels), names,
                        features(val_images) if val_images else None, accept=accept, k=k)
    model.to(memory_format=torch.contiguous_format)
    return save_bundle(path, model, meta, novelty=index)


def novelty_case(folder: Path, classes: Sequence[str] = ("cats", "dogs")) -> tuple[Path, dict[str, list[Path]]]:
    """A bundle with a novelty index over 30 bright flat-colour training images (threshold from
    20 more, accepting all of them), and image groups: ``train``, ``known`` (5 more like them)
    and ``foreign`` (5 dark ones, far from every training image)."""
    groups = {"train": write_flat_images(folder / "train", 30, seed=1),
              "val": write_flat_images(folder / "val", 20, seed=2),
              "known": write_flat_images(folder / "known", 5, seed=3),
              "foreign": write_flat_images(folder / "foreign", 5, seed=4, low=0, high=60)}
    labels = [i % len(classes) for i in range(30)]
    bundle = make_novelty_bundle(folder / "novelty.convlens", groups["train"], labels, groups["val"],
                                 classes=classes, accept=1.0, root=folder)
    return bundle, groups
