"""Shared fixtures. Real photos come from ../shared/datasets when present; tests that need
them skip with a reason otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONVLENS_SHARED", REPO.parent / "shared")) / "datasets"

# Keep the suite deterministic and polite on 2 cores.
os.environ.setdefault("CONVLENS_WORKERS", "2")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs real photos at {path} (../shared/datasets is absent)")
    return path


@pytest.fixture(scope="session")
def cats_dogs() -> Path:
    """../shared/datasets/cats_and_dogs_filtered (pre-split train/validation)."""
    return _need(SHARED / "cats_and_dogs_filtered")


@pytest.fixture(scope="session")
def cat_breeds() -> Path:
    """../shared/datasets/cat_breeds5 (5 classes, with odd files)."""
    return _need(SHARED / "cat_breeds5")


@pytest.fixture(scope="session")
def real_photo() -> Path:
    """One real JPEG photo (a cat)."""
    return _need(SHARED / "cats_and_dogs_filtered" / "train" / "cats" / "cat.0.jpg")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded ``tiny`` two-class bundle (cats, dogs) at 32x32, biases randomised."""
    from tests.bundles import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "model.convlens", random_biases=True)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_bundle`` exported to fp32 ONNX, once per session (the exporter is slow)."""
    from convlens.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_bundle, out)
    return out


@pytest.fixture(scope="session")
def novelty_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    """A bundle with a novelty index and its image groups (``tests.bundles.novelty_case``)."""
    from tests.bundles import novelty_case

    return novelty_case(tmp_path_factory.mktemp("novelty"))


@pytest.fixture(scope="session")
def novelty_onnx(novelty_case: tuple[Path, dict[str, list[Path]]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The novelty bundle exported to fp32 ONNX (with its ``novelty`` output), once per session."""
    from convlens.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("novelty_onnx") / "novelty.onnx"
    export_onnx(novelty_case[0], out)
    return out
