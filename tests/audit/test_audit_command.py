"""`convlens audit` end to end on a generated folder, with a colour-statistics featuriser standing in
for the pretrained backbone (the real backbone is tested on real photos in test_audit_real.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from convlens.audit.command import audit_command
from convlens.cli import main
from convlens.data.decode import decode
from convlens.data.scan import scan
from tests.engine.helpers import make_dataset


def colour_features(root: Any, backbone: str, cache_dir: Any, workers: int, progress: bool) -> SimpleNamespace:
    """Per-channel means and spreads: the generated classes differ by their dominant channel."""
    index = scan(root)
    feats = []
    for e in index.entries:
        a = np.asarray(decode(e.path)[0], dtype=np.float32)
        feats.append(np.concatenate([a.mean(axis=(0, 1)), a.std(axis=(0, 1))]))
    return SimpleNamespace(features=np.array(feats), labels=np.array([e.label for e in index.entries]),
                           paths=[e.rel for e in index.entries], subsets=[""] * len(index.entries),
                           classes=index.classes, root=index.root, skipped=[], seconds={})


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[Path, list[str]]:
    """Three colour classes of 16 images; 2 images moved into the wrong class folder."""
    root = make_dataset(tmp_path / "ds", classes=3, per_class=16)
    moved = []
    for src, dst in (("class_0/img_003.png", "class_1/wrong_a.png"), ("class_2/img_007.png", "class_0/wrong_b.png")):
        shutil.move(root / src, root / dst)
        moved.append(dst)
    return root, moved


def test_audit_ranks_the_planted_errors_first_and_writes_every_output(planted: tuple[Path, list[str]],
                                                                      tmp_path: Path) -> None:
    root, moved = planted
    before = _tree(root)
    out = {k: tmp_path / f"audit.{k}" for k in ("json", "csv", "html")}
    code = audit_command(str(root), json_path=str(out["json"]), csv_path=str(out["csv"]), html_path=str(out["html"]),
                         features_fn=colour_features)
    assert code == 1
    report = json.loads(out["json"].read_text())
    issues = report["label_issues"]
    assert {r["path"] for r in issues[:2]} == set(moved)
    first = {r["path"]: r for r in issues}
    assert first["class_1/wrong_a.png"]["given"] == "class_1" and first["class_1/wrong_a.png"]["suggested"] == "class_0"
    assert first["class_0/wrong_b.png"]["suggested"] == "class_2"
    assert report["summary"]["images"] == 48 and report["exit_code"] == 1
    rows = list(csv.DictReader(out["csv"].read_text().splitlines()))
    assert {r["path"] for r in rows if r["finding"] == "label"} >= set(moved)
    page = out["html"].read_text()
    assert page.count("data:image/jpeg;base64,") >= 2 and "wrong_a.png" in page
    assert "<script" not in page and "src='http" not in page
    assert _tree(root) == before  # auditing changes nothing


def test_relabel_from_the_edited_csv_and_undo(planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, moved = planted
    before = _tree(root)
    findings = tmp_path / "findings.csv"
    audit_command(str(root), csv_path=str(findings), features_fn=colour_features)
    # the user keeps only the two rows they agree with
    rows = [r for r in csv.DictReader(findings.read_text().splitlines()) if r["path"] in moved]
    with open(findings, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert audit_command(str(root), relabel=str(findings)) == 0
    after = _tree(root)
    assert after["class_0/wrong_a.png"] == before["class_1/wrong_a.png"]
    assert after["class_2/wrong_b.png"] == before["class_0/wrong_b.png"]
    assert len(after) == len(before)
    manifests = list(tmp_path.glob("convlens-relabel-*.json"))
    assert len(manifests) == 1
    assert main(["audit", "--undo", str(manifests[0])]) == 0
    assert _tree(root) == before


def test_relabel_into_taken_names_renames_never_overwrites(planted: tuple[Path, list[str]], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = planted
    shutil.copy(root / "class_0/img_000.png", root / "class_1/img_000.png")  # name taken in the target
    before = _tree(root)
    edits = tmp_path / "edits.csv"
    edits.write_text("path,new_class\nclass_0/img_000.png,class_1\nclass_0/img_005.png,class_2\n")
    out = tmp_path / "moves.json"
    assert main(["audit", str(root), "--relabel", str(edits), "--json", str(out)]) == 0
    after = _tree(root)
    assert after["class_1/img_000.png"] == before["class_1/img_000.png"]  # the other file is untouched
    assert after["class_1/img_000-from-class_0.png"] == before["class_0/img_000.png"]
    assert after["class_2/img_005-from-class_0.png"] == before["class_0/img_005.png"]  # class_2 has img_005 too
    assert sorted(after.values()) == sorted(before.values())
    printed = capsys.readouterr().out
    assert "2 renamed" in printed and "(renamed: class_1/img_000.png was taken)" in printed
    moved = json.loads(out.read_text())["moves"]
    assert [(m["path"], m["to"], m["renamed"]) for m in moved["moved"]] == [
        ("class_0/img_000.png", "class_1/img_000-from-class_0.png", True),
        ("class_0/img_005.png", "class_2/img_005-from-class_0.png", True)]
    assert main(["audit", "--undo", moved["manifest"]]) == 0
    assert _tree(root) == before


@pytest.mark.parametrize("rows, message", [
    ("class_0/img_001.png,class_1\n../outside.png,class_1\n", "row 3 of {csv}: '../outside.png' is not an image of"),
    ("class_0/img_001.png,dogs\n", "row 2 of {csv}: 'dogs' is not a class of"),
    ("class_0/img_001.png,class_1\nclass_0/img_002.png,../class_1\n", "row 3 of {csv}: new_class '../class_1' is "
                                                                          "not a class name"),
    ("class_0/img_001.png,class_1\nclass_0/img_001.png,class_2\n", "row 3 of {csv}: 'class_0/img_001.png' is "
                                                                      "listed again"),
])
def test_a_bad_relabel_row_is_one_line_naming_it_and_moves_nothing(planted: tuple[Path, list[str]], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str], rows: str,
                                                                    message: str) -> None:
    root, _ = planted
    before = _tree(root)
    edits = tmp_path / "edits.csv"
    edits.write_text("path,new_class\n" + rows)
    assert main(["audit", str(root), "--relabel", str(edits)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(csv=edits) in err[0] and "nothing was moved" in err[0], err
    assert _tree(root) == before
    assert not list(tmp_path.glob("convlens-relabel-*.json"))  # no manifest either


def test_quarantine_by_kind_and_by_listed_paths_then_undo(planted: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, moved = planted
    before = _tree(root)
    q = tmp_path / "q"
    assert audit_command(str(root), quarantine_dir=str(q), kinds="label", features_fn=colour_features) == 1
    data = json.loads((q / "convlens-quarantine.json").read_text())
    assert {f["path"] for f in data["files"]} >= set(moved)
    assert all(f["kind"] == "label_error" for f in data["files"])
    for rel in moved:
        assert not (root / rel).exists() and (q / rel).read_bytes()
    assert audit_command(None, undo=str(q)) == 0
    assert _tree(root) == before and not any(p.is_file() for p in q.rglob("*.png"))

    listed = tmp_path / "listed.csv"
    listed.write_text("path\nclass_1/img_004.png\n")
    assert main(["audit", str(root), "--quarantine", str(q), "--paths", str(listed)]) == 0
    assert (q / "class_1/img_004.png").is_file() and not (root / "class_1/img_004.png").exists()
    assert main(["check", "--undo", str(q / "convlens-quarantine.json")]) == 0  # the same mechanism
    assert _tree(root) == before


def test_the_page_of_a_quarantining_audit_says_where_each_photo_went(planted: tuple[Path, list[str]],
                                                                     tmp_path: Path) -> None:
    """A quarantine into names already taken renames; the page written by the same run shows the
    moved photos (thumbnails from their new place) and names where they went."""
    root, moved = planted
    q = tmp_path / "q"
    for rel in moved:  # the quarantine folder already holds files of these names
        (q / rel).parent.mkdir(parents=True, exist_ok=True)
        (q / rel).write_bytes(b"the user's own file")
    page = tmp_path / "audit.html"
    assert audit_command(str(root), quarantine_dir=str(q), kinds="label", html_path=str(page),
                         features_fn=colour_features) == 1
    manifest = json.loads((q / "convlens-quarantine.json").read_text())
    html_text = page.read_text()
    for f in manifest["files"]:
        assert f["to"] != f["path"] and f"moved to {q / f['to']}" in html_text  # renamed, and said so
    assert "(cannot decode)" not in html_text  # every thumbnail read from the photo's new place
    assert all((q / rel).read_bytes() == b"the user's own file" for rel in moved)


@pytest.mark.parametrize("argv, message", [
    (["--quarantine", "Q"], "--quarantine needs what to move"),
    (["--quarantine", "Q", "--kinds", "labels"], "--kinds takes label, duplicate, outlier"),
    (["--kinds", "label"], "add --quarantine QDIR"),
    (["--relabel", "x.csv", "--quarantine", "Q", "--kinds", "all"], "either --relabel or --quarantine"),
    (["--folds", "0"], "folds must be at least 2"),  # not silently the default
])
def test_bad_options_are_one_line_errors(planted: tuple[Path, list[str]], argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = planted
    assert main(["audit", str(root), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_listed_path_outside_the_dataset_is_refused(planted: tuple[Path, list[str]], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = planted
    listed = tmp_path / "listed.csv"
    listed.write_text("path\n../elsewhere.png\n")
    assert main(["audit", str(root), "--quarantine", str(tmp_path / "q"), "--paths", str(listed)]) == 2
    assert f"row 2 of {listed}: '../elsewhere.png' is not an image of" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
