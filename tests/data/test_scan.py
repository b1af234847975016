from __future__ import annotations

from pathlib import Path

import pytest

from convlens.data.scan import is_system_file, scan
from convlens.errors import DataError
from tests.data.conftest import make_class_dataset


def test_class_layout_sorted_nested_and_system_files_ignored(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"zebra": 2, "Apple": 1, "mango": 1})
    (root / "zebra" / "sub" / "deep").mkdir(parents=True)
    (root / "zebra" / "sub" / "deep" / "x.png").write_bytes((root / "zebra" / "img_000.png").read_bytes())
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini", ".hidden.png"):
        (root / "mango" / junk).write_bytes(b"junk")
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"x")
    (root / "mango" / "notes.txt").write_text("labels")
    (root / "README.md").write_text("readme")
    idx = scan(root)
    assert idx.classes == ["Apple", "mango", "zebra"]  # sorted like Keras (code-point order)
    assert idx.layout == "classes" and not idx.presplit
    rels = [e.rel for e in idx.entries]
    assert "zebra/sub/deep/x.png" in rels
    assert {e.class_name for e in idx.entries if e.rel.startswith("zebra/")} == {"zebra"}
    assert not any(Path(r).name.startswith(".") or Path(r).name in ("Thumbs.db", "desktop.ini") for r in rels)
    assert idx.ignored == ["mango/notes.txt"] and idx.loose == ["README.md"]
    assert idx.class_counts() == {"Apple": 1, "mango": 1, "zebra": 3}
    assert [e.label for e in idx.entries if e.class_name == "mango"] == [1]


def test_presplit_layout(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_class_dataset(root / "train", {"cats": 2, "dogs": 2})
    make_class_dataset(root / "validation", {"cats": 1, "dogs": 1}, start=10)
    make_class_dataset(root / "test", {"cats": 1, "dogs": 1}, start=20)
    idx = scan(root)
    assert idx.presplit and idx.classes == ["cats", "dogs"]
    assert idx.subsets == ["train", "val", "test"]
    assert idx.class_counts("val") == {"cats": 1, "dogs": 1}
    assert {e.subset for e in idx.entries} == {"train", "val", "test"}


def test_presplit_real(cats_dogs: Path) -> None:
    idx = scan(cats_dogs)
    assert idx.presplit and idx.classes == ["cats", "dogs"]
    assert idx.class_counts("train") == {"cats": 1000, "dogs": 1000}


def test_a_folder_named_train_alone_is_a_class(tmp_path: Path) -> None:
    root = make_class_dataset(tmp_path / "ds", {"train": 1, "other": 1})
    idx = scan(root)
    assert not idx.presplit and idx.classes == ["other", "train"]


@pytest.mark.parametrize("case", ["missing", "file", "no_classes", "only_files", "two_val", "empty_split"])
def test_clear_errors(tmp_path: Path, case: str) -> None:
    root = tmp_path / "ds"
    if case == "file":
        root.write_text("x")
    elif case == "no_classes":
        root.mkdir()
    elif case == "only_files":
        root.mkdir()
        (root / "a.jpg").write_bytes(b"x")
    elif case == "two_val":
        make_class_dataset(root / "train", {"a": 1})
        make_class_dataset(root / "val", {"a": 1})
        make_class_dataset(root / "valid", {"a": 1})
    elif case == "empty_split":
        make_class_dataset(root / "train", {"a": 1})
        (root / "val").mkdir()
    with pytest.raises(DataError) as e:
        scan(root)
    msg = str(e.value)
    assert "Received:" in msg and "\n" not in msg
    if case == "only_files":
        assert "one folder per class" in msg


def test_is_system_file() -> None:
    assert is_system_file(".DS_Store") and is_system_file("Thumbs.db") and is_system_file("DESKTOP.INI")
    assert is_system_file("._photo.jpg") and not is_system_file("photo.jpg")


def test_list_images_one_rule_set_with_links(tmp_path: Path) -> None:
    from convlens.data.scan import list_images

    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "noext", "sub/b.png", "notes.txt", "Thumbs.db", "~$lock.jpg", ".hidden.jpg"):
        (root / name).write_bytes(b"x")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # walked once, no endless loop
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "c.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(other, target_is_directory=True)
    files, ignored = list_images(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a.jpg", "noext", "linked/c.jpg", "sub/b.png"]
    assert [f.name for f in ignored] == ["notes.txt"]
