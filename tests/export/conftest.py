"""Fixtures for the export tests: a tiny two-class bundle and its verified ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.bundles import make_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded ``tiny`` two-class bundle (cats, dogs) at 32x32."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "model.convlens")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_bundle`` exported to fp32 ONNX (exported once per session: the exporter is slow)."""
    from convlens.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_bundle, out)
    return out
