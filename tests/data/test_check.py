from __future__ import annotations

import json
from pathlib import Path

import pytest

from convlens.cli import main
from convlens.data.check import (
    SkippedFiles,
    check_dataset,
    inspect_entries,
    quarantine,
    run_check,
    skipped_message,
)
from convlens.data.moves import MANIFEST_NAME, undo_quarantine
from convlens.data.scan import scan
from convlens.errors import DataError, ImageError
from tests.data.conftest import EXPECTED, MAX_PIXELS, make_class_dataset, photo, save, tree_hashes


def _check(root: Path, **kw):
    return check_dataset(root, workers=1, max_pixels=MAX_PIXELS, min_side=8, progress=False, **kw)


def test_every_file_is_classified_correctly(zoo: Path) -> None:
    report = _check(zoo)
    got = {r.rel: r for r in report.records}
    assert set(got) == set(EXPECTED), "system files must be ignored, every other file checked"
    for rel, (status, what) in EXPECTED.items():
        r = got[rel]
        assert r.status == status, (rel, r.status, r.kind, r.message)
        if status == "unusable":
            assert r.kind == what, (rel, r.kind, r.message)
        elif status == "warning":
            assert set(r.info.warnings) == set(what), (rel, r.info.warnings)
            assert len(r.details) == len(r.info.warnings)
        else:
            assert r.info.warnings == []


def test_exif_and_class_of_nested_files(zoo: Path) -> None:
    got = {r.rel: r for r in _check(zoo).records}
    assert got["dogs/nested/deeper.jpg"].class_name == "dogs"
    assert "orientation 6" in got["cats/exif_rotated.jpg"].details[0]
    assert "content is PNG" in got["cats/png_named.jpg"].details[0]
    assert got["dogs/gray16.png"].info.grayscale and not got["dogs/rgba.png"].info.grayscale


def test_dataset_problems_label_conflict(zoo: Path) -> None:
    report = _check(zoo)
    dups = report.duplicates()
    assert len(dups) == 1
    assert sorted(dups[0]["paths"]) == ["cats/conflict.jpg", "dogs/good3.jpg"]
    assert dups[0]["label_conflict"] is True
    assert report.exit_code == 1


def test_clean_dataset_exits_zero_and_problems_are_counted(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 4, "b": 4})
    report = _check(root)
    assert report.exit_code == 0 and not report.has_problems
    assert report.class_counts() == {"a": 4, "b": 4}
    # one-image class, empty class and imbalance are problems
    make_class_dataset(tmp_path / "ds", {"c": 1}, start=100)
    (tmp_path / "ds" / "d").mkdir()
    cp = _check(root).class_problems()
    assert cp["single"] == ["c"] and cp["empty"] == ["d"]
    make_class_dataset(tmp_path / "ds", {"a": 30}, start=200)
    cp = _check(root).class_problems()
    assert cp["imbalance_ratio"] == pytest.approx(34 / 1) and cp["imbalanced"]


def test_within_class_duplicates_and_presplit_leak(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for sub in ("train", "validation"):
        make_class_dataset(root / sub, {"a": 3, "b": 3}, start=0 if sub == "train" else 50)
    (root / "train" / "a" / "copy.png").write_bytes((root / "train" / "a" / "img_000.png").read_bytes())
    (root / "validation" / "b" / "leak.png").write_bytes((root / "train" / "b" / "img_000.png").read_bytes())
    report = _check(root)
    assert report.layout == "presplit"
    groups = {tuple(sorted(g["paths"])): g for g in report.duplicates()}
    within = groups[("train/a/copy.png", "train/a/img_000.png")]
    assert not within["label_conflict"] and not within["split_leak"]
    leak = groups[("train/b/img_000.png", "validation/b/leak.png")]
    assert leak["split_leak"] and not leak["label_conflict"]


def test_near_duplicates_with_perceptual_hash(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 3, "b": 3}, size=(64, 48))
    src = root / "a" / "img_000.png"
    from PIL import Image

    with Image.open(src) as im:  # the same picture, re-encoded as a JPEG: different bytes
        save(im.convert("RGB"), root / "b" / "near.jpg", "JPEG", quality=80)
    report = _check(root, near_duplicates=True)
    assert report.near_duplicates == [["a/img_000.png", "b/near.jpg"]]
    assert report.duplicates() == []
    assert report.exit_code == 1


def test_quarantine_and_undo_restore_the_tree_byte_identically(zoo: Path, tmp_path: Path) -> None:
    before = tree_hashes(zoo)
    q = tmp_path / "quarantine"
    code = run_check(str(zoo), quarantine_dir=str(q), workers=1, max_pixels=MAX_PIXELS, min_side=8, progress=False)
    assert code == 1
    moved = {rel for rel, (status, _) in EXPECTED.items() if status == "unusable"}
    after = tree_hashes(zoo)
    assert set(before) - set(after) == moved
    assert {k: before[k] for k in after} == after  # nothing else touched
    manifest = json.loads((q / MANIFEST_NAME).read_text())
    assert {f["path"] for f in manifest["files"]} == moved
    for rel in moved:
        assert tree_hashes(q).get(rel) == before[rel]
    # The cleaned dataset checks without unusable files.
    assert _check(zoo).unusable == []
    assert run_check(None, undo=str(q / MANIFEST_NAME), progress=False) == 0
    assert tree_hashes(zoo) == before
    assert json.loads((q / MANIFEST_NAME).read_text())["files"] == []
    assert run_check(None, undo=str(q / MANIFEST_NAME), progress=False) == 0  # twice: harmless
    assert tree_hashes(zoo) == before


def test_quarantine_into_a_taken_name_renames_and_undo_restores(zoo: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(zoo)
    q = tmp_path / "q"
    (q / "cats").mkdir(parents=True)
    (q / "cats" / "zero.jpg").write_bytes(b"someone else's file")
    (q / "cats" / "zero-from-cats.jpg").write_bytes(b"and another one")
    report_json = tmp_path / "r.json"
    assert main(["check", str(zoo), "--quarantine", str(q), "--json", str(report_json), "--workers", "1",
                 "--max-pixels", str(MAX_PIXELS)]) == 1
    assert (q / "cats" / "zero.jpg").read_bytes() == b"someone else's file"  # never overwritten
    assert (q / "cats" / "zero-from-cats.jpg").read_bytes() == b"and another one"
    assert (q / "cats" / "zero-from-cats-2.jpg").read_bytes() == b""  # the 0-byte file, under a free name
    entry = next(f for f in json.loads((q / MANIFEST_NAME).read_text())["files"] if f["path"] == "cats/zero.jpg")
    assert entry["to"] == "cats/zero-from-cats-2.jpg" and entry["renamed"] is True and entry["size"] == 0
    err = capsys.readouterr().err
    assert f"cats/zero.jpg -> {q.resolve()}/cats/zero-from-cats-2.jpg (renamed: cats/zero.jpg was taken)" in err
    moved = {m["path"]: m for m in json.loads(report_json.read_text())["moves"]["moved"]}
    assert moved["cats/zero.jpg"]["renamed"] and moved["cats/zero.jpg"]["new_path"].endswith("zero-from-cats-2.jpg")
    assert main(["check", "--undo", str(q / MANIFEST_NAME)]) == 0
    assert tree_hashes(zoo) == before
    assert sorted(p.name for p in (q / "cats").iterdir()) == ["zero-from-cats.jpg", "zero.jpg"]


def test_undo_restores_all_but_the_file_whose_place_is_taken(zoo: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(zoo)
    q = tmp_path / "q"
    manifest = quarantine(_check(zoo), q).manifest
    (zoo / "cats" / "text.jpg").write_text("a new file with the old name")
    assert main(["check", "--undo", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert f"could not restore cats/text.jpg: {zoo}/cats/text.jpg holds a file again" in err
    assert (zoo / "cats" / "text.jpg").read_text() == "a new file with the old name"
    assert (q / "cats" / "text.jpg").exists()
    after = tree_hashes(zoo)
    assert {k: v for k, v in after.items() if k != "cats/text.jpg"} == {k: v for k, v in before.items()
                                                                         if k != "cats/text.jpg"}
    assert [f["path"] for f in json.loads(manifest.read_text())["files"]] == ["cats/text.jpg"]
    (zoo / "cats" / "text.jpg").unlink()  # the user clears the place; undo again restores the rest
    assert undo_quarantine(manifest).restored == ["cats/text.jpg"]
    assert tree_hashes(zoo) == before
    assert undo_quarantine(manifest).exit_code == 0  # a third time: harmless


def test_quarantine_inside_dataset_is_refused(zoo: Path) -> None:
    with pytest.raises(DataError, match="outside the dataset"):
        quarantine(_check(zoo), zoo / "bad")


def test_check_writes_nothing_into_the_dataset(zoo: Path, tmp_path: Path) -> None:
    before = tree_hashes(zoo)
    run_check(str(zoo), json_path=str(tmp_path / "r.json"), workers=1, max_pixels=MAX_PIXELS, progress=False)
    assert tree_hashes(zoo) == before


def test_cli_exit_codes_and_json(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = main(["check", str(zoo), "--json", str(out), "--workers", "1", "--max-pixels", str(MAX_PIXELS)])
    assert code == 1
    rep = json.loads(out.read_text())
    assert [i["path"] for i in rep["unusable"]["zero_bytes"]] == ["cats/zero.jpg"]
    assert [i["path"] for i in rep["unusable"]["too_large"]] == ["cats/huge.png"]
    assert rep["summary"]["unusable"] == 5 and rep["exit_code"] == 1
    printed = capsys.readouterr().out
    assert "cats/truncated.jpg" in printed and "label conflict" in printed

    clean = make_class_dataset(tmp_path / "clean", {"a": 3, "b": 3})
    assert main(["check", str(clean), "--workers", "1"]) == 0
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert main(["check", str(clean), "--max-pixels", "0"]) == 2
    assert main(["check"]) == 2
    assert "error" in capsys.readouterr().err


def test_parallel_check_matches_in_process(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"a": 30, "b": 30})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    entries = scan(root).entries
    serial = inspect_entries(entries, workers=1, progress=False)
    parallel = inspect_entries(entries, workers=2, progress=False)
    assert [(r.rel, r.status, r.kind, r.sha256) for r in serial] == [(r.rel, r.status, r.kind, r.sha256) for r in parallel]
    assert sum(r.status == "unusable" for r in parallel) == 1


def test_skipped_message() -> None:
    errs = SkippedFiles([ImageError("/d/a/x.jpg", "truncated", "t"), ImageError("/d/a/y.jpg", "not_image", "n")],
                        root=Path("/d"))
    assert skipped_message(errs) == "skipped 2 unusable files; run `convlens check /d` for details"
    assert skipped_message([ImageError("x", "corrupt", "c")]) == "skipped 1 unusable file; run `convlens check DIR` for details"
    assert skipped_message([]) == ""


def test_cat_breeds_webp_named_png_and_non_jfif_jpegs(cat_breeds: Path) -> None:
    index = scan(cat_breeds)
    wanted = {"American_Wirehair/Cat1035.png", "American_Curl/Cat672.jpg"}
    curl = [e for e in index.entries if e.rel.startswith("American_Curl/") and e.path.suffix == ".jpg"]
    non_jfif = [e for e in curl if b"JFIF" not in e.path.read_bytes()[:16]][:8]
    assert non_jfif, "expected Exif/ICC JPEGs without the JFIF marker"
    entries = [e for e in index.entries if e.rel in wanted] + non_jfif
    recs = {r.rel: r for r in inspect_entries(entries, workers=1, progress=False)}
    webp = recs["American_Wirehair/Cat1035.png"]
    assert webp.status == "warning" and "ext_mismatch" in webp.info.warnings and webp.info.format == "WEBP"
    assert recs["American_Curl/Cat672.jpg"].usable
    assert all(recs[e.rel].usable for e in non_jfif)


def test_photo_helper_is_deterministic() -> None:
    assert photo(3).tobytes() == photo(3).tobytes()
