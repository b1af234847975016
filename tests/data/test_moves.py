"""Moving real photos as a user would, through the CLI: misfiled photos whose names are taken in
the class they belong to (as in PetImages, where ``Cat/N.jpg`` and ``Dog/N.jpg`` are numbered
independently), quarantines into taken names, undo after the user changed things, bad input, a
read-only dataset and a quarantine disk that fills up mid-way (a small tmpfs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from convlens.cli import main
from convlens.data.moves import MANIFEST_NAME
from tests.data.conftest import tree_hashes

# Cat/N.jpg and Dog/N.jpg, N = 0..7, with three misfiled photos: dogs at Cat/3 and Cat/5, a cat at
# Dog/4; Dog/5-from-Cat.jpg is left by an earlier relabel, so Cat/5 must become Dog/5-from-Cat-2.jpg.
N = 8
MISFILED = {"Cat/3.jpg": "dog.20.jpg", "Cat/5.jpg": "dog.21.jpg", "Dog/4.jpg": "cat.20.jpg"}
FIXES = [("Cat/3.jpg", "Dog", "Dog/3-from-Cat.jpg"), ("Cat/5.jpg", "Dog", "Dog/5-from-Cat-2.jpg"),
         ("Dog/4.jpg", "Cat", "Cat/4-from-Dog.jpg")]


@pytest.fixture()
def pets(cats_dogs: Path, tmp_path: Path) -> Path:
    """A PetImages-like copy of 17 real photos in tmp_path."""
    root = tmp_path / "PetImages"
    src = cats_dogs / "train"
    for cls in ("Cat", "Dog"):
        (root / cls).mkdir(parents=True)
        for i in range(N):
            rel = f"{cls}/{i}.jpg"
            name = MISFILED.get(rel, f"{cls.lower()}.{i}.jpg")
            shutil.copy(src / ("cats" if name.startswith("cat") else "dogs") / name, root / rel)
    shutil.copy(src / "dogs" / "dog.22.jpg", root / "Dog" / "5-from-Cat.jpg")
    return root


def _contents(root: Path) -> Counter[str]:
    return Counter(tree_hashes(root).values())


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_relabel_misfiled_photos_whose_names_are_taken_then_undo(pets: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(pets)
    edits = _write_csv(tmp_path / "findings.csv", "path,given,new_class",
                       [f"{rel},{rel.split('/')[0]},{new}" for rel, new, _ in FIXES])
    out = tmp_path / "moves.json"
    assert main(["audit", str(pets), "--relabel", str(edits), "--json", str(out)]) == 0
    after = tree_hashes(pets)
    assert Counter(after.values()) == Counter(before.values())  # the same photos, none lost, none copied
    for rel, _, to in FIXES:
        assert rel not in after and after[to] == before[rel]
    assert after["Dog/5-from-Cat.jpg"] == before["Dog/5-from-Cat.jpg"]  # the earlier file is untouched
    printed = capsys.readouterr().out
    assert "moved 3 file(s) to their new class folders (3 renamed" in printed
    assert f"Cat/5.jpg -> {pets}/Dog/5-from-Cat-2.jpg (renamed: Dog/5.jpg was taken)" in printed
    moves = json.loads(out.read_text())["moves"]
    assert [(m["path"], m["to"], m["renamed"]) for m in moves["moved"]] == [(r, t, True) for r, _, t in FIXES]
    manifest = json.loads(Path(moves["manifest"]).read_text())
    assert [(f["path"], f["to"], f["size"]) for f in manifest["files"]] == [
        (r, t, (pets / t).stat().st_size) for r, _, t in FIXES]
    assert main(["audit", "--undo", moves["manifest"]]) == 0
    assert tree_hashes(pets) == before
    capsys.readouterr()
    assert main(["check", "--undo", moves["manifest"]]) == 0  # twice: harmless
    assert "restored 0 file(s)" in capsys.readouterr().err  # check's messages go to stderr when piped
    assert tree_hashes(pets) == before


def test_quarantine_into_taken_names_keeps_both_and_undo_restores(pets: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "odd"
    (q / "Cat").mkdir(parents=True)
    (q / "Dog").mkdir()
    shutil.copy(pets / "Cat" / "0.jpg", q / "Cat" / "3.jpg")  # the user's own files, with the same names
    shutil.copy(pets / "Dog" / "0.jpg", q / "Dog" / "4.jpg")
    foreign = tree_hashes(q)
    before = tree_hashes(pets)
    listed = _write_csv(tmp_path / "listed.csv", "path", ["Cat/3.jpg", "Cat/5.jpg", "Dog/4.jpg"])
    assert main(["audit", str(pets), "--quarantine", str(q), "--paths", str(listed)]) == 0
    got = tree_hashes(q)
    assert {k: got[k] for k in foreign} == foreign  # never overwritten
    assert got["Cat/3-from-Cat.jpg"] == before["Cat/3.jpg"] and got["Dog/4-from-Dog.jpg"] == before["Dog/4.jpg"]
    assert got["Cat/5.jpg"] == before["Cat/5.jpg"]  # a free name stays as it is
    printed = capsys.readouterr().out
    assert "moved 3 listed file(s)" in printed and "(2 renamed: their names were taken)" in printed
    assert main(["audit", "--undo", str(q)]) == 0
    assert tree_hashes(pets) == before and tree_hashes(q) == {**foreign, MANIFEST_NAME: tree_hashes(q)[MANIFEST_NAME]}


def test_undo_after_the_user_moved_or_changed_files_restores_the_rest(pets: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(pets)
    edits = _write_csv(tmp_path / "edits.csv", "path,new_class", [f"{rel},{new}" for rel, new, _ in FIXES])
    out = tmp_path / "moves.json"
    assert main(["audit", str(pets), "--relabel", str(edits), "--json", str(out)]) == 0
    manifest = json.loads(out.read_text())["moves"]["manifest"]
    shutil.move(pets / "Dog/3-from-Cat.jpg", tmp_path / "kept.jpg")  # moved away since
    edited = pets / "Cat/4-from-Dog.jpg"
    edited.write_bytes(edited.read_bytes()[:-100])  # changed since (cropped by some tool, say)
    changed = edited.read_bytes()
    capsys.readouterr()
    for _ in range(2):  # the second undo reports the same two files and changes nothing
        assert main(["audit", "--undo", manifest]) == 1
        lines = capsys.readouterr().out.splitlines()
        failed = sorted(line for line in lines if line.startswith("could not restore"))
        assert len(failed) == 2, lines
        assert failed[0].startswith("could not restore Cat/3.jpg: it is no longer at ")
        assert failed[1].startswith(f"could not restore Dog/4.jpg: {edited} changed since it was moved")
        after = tree_hashes(pets)
        assert after["Cat/5.jpg"] == before["Cat/5.jpg"] and "Dog/5-from-Cat-2.jpg" not in after  # restored
        assert edited.read_bytes() == changed and "Dog/4.jpg" not in after and "Cat/3.jpg" not in after
    assert [f["path"] for f in json.loads(Path(manifest).read_text())["files"]] == ["Cat/3.jpg", "Dog/4.jpg"]


def test_a_bad_row_names_it_and_moves_nothing(pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(pets)
    for rows, message in ((["Cat/3.jpg,Dog", "../elsewhere.jpg,Cat"], "row 3 of {}: '../elsewhere.jpg' is not an "
                                                                      "image of"),
                          (["Cat/3.jpg,Dog", "Dog/4.jpg,Kitten"], "row 3 of {}: 'Kitten' is not a class of"),
                          (["Cat/3.jpg,Dog/../Cat"], "row 2 of {}: new_class 'Dog/../Cat' is not a class name")):
        edits = _write_csv(tmp_path / "edits.csv", "path,new_class", rows)
        assert main(["audit", str(pets), "--relabel", str(edits)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message.format(edits) in err[0] and "nothing was moved" in err[0], err
        assert tree_hashes(pets) == before and not list(tmp_path.glob("convlens-relabel-*"))


# ----------------------------------------------------------------------------- small filesystems
@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB filesystem of its own (a tmpfs), unmounted afterwards."""
    with _tmpfs(tmp_path / "small", "2m") as d:
        yield d


@pytest.fixture()
def read_only_pets(pets: Path, tmp_path: Path) -> Iterator[Path]:
    """The pets on a filesystem mounted read-only."""
    with _tmpfs(tmp_path / "ro", "8m") as d:
        shutil.copytree(pets, d / "PetImages")
        (d / "PetImages" / "Cat" / "9.jpg").write_bytes(b"")  # unusable: what check --quarantine moves
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        yield d / "PetImages"


def test_a_full_quarantine_disk_moves_what_fits_loses_nothing_and_says_so(pets: Path, small_disk: Path,
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(pets)
    order = sorted(before, key=lambda rel: (pets / rel).stat().st_size)
    small, large = order[:3], order[-1]
    listed_files = [*small[:2], large, small[2]]  # the large one cannot fit: the third move fails
    page = 4096
    pages = [-(-(pets / rel).stat().st_size // page) for rel in listed_files]
    overhead = 8 * page  # the manifest and its reserve
    free = shutil.disk_usage(small_disk).free
    (small_disk / "other-program.bin").write_bytes(b"\0" * (free - overhead - page * (pages[0] + pages[1] + 1)))
    q = small_disk / "q"
    listed = _write_csv(tmp_path / "listed.csv", "path", listed_files)
    assert main(["audit", str(pets), "--quarantine", str(q), "--paths", str(listed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"could not move {large} to {q}/{large}: No space left on device" in err[0]
    assert "free in" in err[0] and "moved 2 of 4 file(s), the others are untouched" in err[0]
    after, quarantined = tree_hashes(pets), tree_hashes(q)
    assert set(before) - set(after) == set(small[:2])  # only the fully moved ones left the dataset
    assert {k: before[k] for k in after} == after
    assert {k: v for k, v in quarantined.items() if k != MANIFEST_NAME} == {k: before[k] for k in small[:2]}
    assert not [p for p in q.rglob("*") if p.name.startswith(".")]  # no partial copy, no reserve file
    manifest = json.loads((q / MANIFEST_NAME).read_text())
    assert [(f["path"], f["to"], f["size"]) for f in manifest["files"]] == [
        (rel, rel, (q / rel).stat().st_size) for rel in small[:2]]
    assert main(["audit", "--undo", str(q)]) == 0
    assert tree_hashes(pets) == before


def test_a_read_only_dataset_is_one_line_and_nothing_moves(read_only_pets: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(read_only_pets)
    edits = _write_csv(tmp_path / "edits.csv", "path,new_class", ["Cat/3.jpg,Dog"])
    listed = _write_csv(tmp_path / "listed.csv", "path", ["Cat/3.jpg"])
    for argv in (["--relabel", str(edits)], ["--quarantine", str(tmp_path / "q"), "--paths", str(listed)]):
        assert main(["audit", str(read_only_pets), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is read-only" in err[0] and "nothing was moved" in err[0], err
        assert tree_hashes(read_only_pets) == before
    assert main(["check", str(read_only_pets), "--quarantine", str(tmp_path / "q"), "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "read-only" in line]
    assert len(err) == 1 and f"{read_only_pets}/Cat is read-only" in err[0] and "nothing was moved" in err[0], err
    assert tree_hashes(read_only_pets) == before
    assert not list(tmp_path.glob("convlens-relabel-*")) and not (tmp_path / "q" / MANIFEST_NAME).exists()


def test_a_full_disk_at_the_manifests_final_write_says_what_moved_and_how_to_undo(
        pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """convlens.files reports ENOSPC as DiskFullError (not an OSError): the final manifest write
    failing still gives the one line naming what moved and the undo, and the undo works."""
    from convlens.data import moves
    from convlens.errors import DiskFullError

    before = tree_hashes(pets)
    real, calls = moves.cio.write_json, []

    def write_json(path: Path, data: object, **kw: object) -> None:
        calls.append(path)
        if len(calls) == 2:  # the rewrite after the moves
            raise DiskFullError("the disk filled while writing the manifest", "free some space", path=str(path))
        real(path, data, **kw)

    monkeypatch.setattr(moves.cio, "write_json", write_json)
    listed = _write_csv(tmp_path / "listed.csv", "path", ["Cat/3.jpg", "Dog/4.jpg"])
    q = tmp_path / "q"
    assert main(["audit", str(pets), "--quarantine", str(q), "--paths", str(listed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moved 2 of 2 file(s) but could not update the manifest" in err[0]
    assert "the disk filled while writing the manifest" in err[0] and "--undo" in err[0]
    monkeypatch.setattr(moves.cio, "write_json", real)
    assert main(["audit", "--undo", str(q)]) == 0
    assert tree_hashes(pets) == before
