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
# The suite's decode caches, feature caches and onnx-engine exports go to a folder of its own
# (shared by the whole session, and by its subprocesses through the environment), never into the
# user's cache folder.
if "CONVLENS_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CONVLENS_CACHE_DIR"] = tempfile.mkdtemp(prefix="convlens-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["CONVLENS_CACHE_DIR"], ignore_errors=True)


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


@pytest.fixture
def small_disk(tmp_path: Path):
    """A factory of tiny filesystems standing in for a full disk: ``small_disk("3m")`` mounts a
    tmpfs of that size (root only) and returns its folder; each is unmounted afterwards."""
    import subprocess
    import sys

    mounted: list[Path] = []

    def mount(size: str = "3m") -> Path:
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root on Linux")
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def enospc_at(monkeypatch: pytest.MonkeyPatch):
    """``enospc_at(needle, skip=0)``: the fsync of a file whose (temporary) name contains ``needle``
    fails with ENOSPC, after ``skip`` such fsyncs succeed; returns the list of failures (Linux only:
    it finds a descriptor's file through /proc). What convlens's writers see when the disk fills."""
    import errno
    import sys

    if sys.platform != "linux":
        pytest.skip("finds the file of a descriptor through /proc/self/fd")
    real = os.fsync

    def arm(needle: str, skip: int = 0) -> list[str]:
        seen, failed = [0], []

        def fsync(fd: int) -> None:
            name = os.readlink(f"/proc/self/fd/{fd}")
            if needle in name and not failed:
                seen[0] += 1
                if seen[0] > skip:
                    failed.append(name)
                    raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        return failed

    return arm


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
