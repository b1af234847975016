from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from convlens.data.split import (
    assign_subsets,
    check_fractions,
    hash_unit,
    read_split_csv,
    write_split_csv,
)
from convlens.errors import ConfigError, DataError


def _files(n: int, classes=("a", "b"), start: int = 0) -> tuple[list[str], list[str]]:
    rels, cls = [], []
    for c in classes:
        for i in range(start, start + n):
            rels.append(f"{c}/img_{i:05d}.jpg")
            cls.append(c)
    return rels, cls


def test_deterministic_and_seed_dependent() -> None:
    rels, cls = _files(300)
    a = assign_subsets(rels, cls)
    assert a == assign_subsets(rels, cls)
    assert a != assign_subsets(rels, cls, seed=1)
    assert set(a) == {"train", "val"}


def test_stratified_fraction_per_class() -> None:
    rels, cls = _files(1000, classes=("a", "b", "c"))
    out = assign_subsets(rels, cls, val_fraction=0.2, test_fraction=0.1)
    for c in ("a", "b", "c"):
        counts = Counter(s for s, k in zip(out, cls, strict=True) if k == c)
        assert abs(counts["val"] / 1000 - 0.2) < 0.04
        assert abs(counts["test"] / 1000 - 0.1) < 0.03


def test_adding_ten_percent_moves_no_existing_file() -> None:
    rels, cls = _files(400)
    before = dict(zip(rels, assign_subsets(rels, cls), strict=True))
    new_rels, new_cls = _files(40, start=400)
    all_rels, all_cls = rels + new_rels, cls + new_cls
    after = dict(zip(all_rels, assign_subsets(all_rels, all_cls), strict=True))
    assert all(after[r] == before[r] for r in rels)
    # and removing files moves nothing either
    kept = rels[::2]
    again = dict(zip(kept, assign_subsets(kept, cls[::2]), strict=True))
    assert all(again[r] == before[r] for r in kept)


def test_exact_duplicates_land_on_the_same_side() -> None:
    rels, cls = _files(200)
    shas = [f"h{i}" for i in range(len(rels))]
    # 30 groups of three copies each, spread over both classes
    for g in range(30):
        for k in (g, g + 100, g + 250):
            shas[k] = f"dup{g}"
    out = assign_subsets(rels, cls, shas)
    for g in range(30):
        sides = {out[k] for k in (g, g + 100, g + 250)}
        assert len(sides) == 1


def test_presplit_subsets_are_kept_and_val_is_split_from_train_when_missing() -> None:
    rels = ["train/a/1", "train/a/2", "val/a/3", "test/a/4"]
    cls = ["a"] * 4
    given = ["train", "train", "val", "test"]
    assert assign_subsets(rels, cls, None, given) == given
    rels2, cls2 = _files(100)
    given2 = ["train"] * len(rels2)
    out = assign_subsets(rels2 + ["test/a/x"], cls2 + ["a"], None, given2 + ["test"], test_fraction=0.3)
    assert out[-1] == "test" and "val" in out[:-1] and out[:-1].count("test") == 0


def test_tiny_class_gets_a_validation_image() -> None:
    rels = ["a/1", "a/2", "b/1", "b/2", "b/3"]
    cls = ["a", "a", "b", "b", "b"]
    for seed in range(20):
        out = assign_subsets(rels, cls, seed=seed)
        for c in ("a", "b"):
            sides = [s for s, k in zip(out, cls, strict=True) if k == c]
            assert "val" in sides and "train" in sides


def test_hash_unit_is_uniform_and_stable() -> None:
    assert hash_unit("x", 1337) == hash_unit("x", 1337)
    vals = [hash_unit(str(i), 0) for i in range(2000)]
    assert min(vals) >= 0 and max(vals) < 1 and abs(sum(vals) / len(vals) - 0.5) < 0.03


def test_csv_round_trip_and_errors(tmp_path: Path) -> None:
    rows = [("a/x, with comma.jpg", "a", "train"), ("b/y.jpg", "b", "val"), ("b/z.jpg", "b", "test")]
    p = tmp_path / "run" / "split.csv"
    write_split_csv(p, rows)
    assert p.read_text().splitlines()[0] == "path,class,subset"
    assert read_split_csv(p) == rows
    (tmp_path / "bad.csv").write_text("path,class,subset\na.jpg,a,holdout\n")
    with pytest.raises(DataError, match="line 2"):
        read_split_csv(tmp_path / "bad.csv")
    (tmp_path / "nohdr.csv").write_text("a.jpg,a,train\n")
    with pytest.raises(DataError, match="header"):
        read_split_csv(tmp_path / "nohdr.csv")
    with pytest.raises(DataError, match="not found"):
        read_split_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize("val,test", [(-0.1, 0), (1.0, 0), (0.5, 0.5), (0.2, -1)])
def test_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(ConfigError, match="Received"):
        check_fractions(val, test)
