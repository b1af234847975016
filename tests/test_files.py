"""Atomic writes: an exception mid-write leaves the old file and no temp file behind."""

from __future__ import annotations

import pytest

from convlens.files import atomic_open, write_json, write_text


def test_atomic_write_replaces_whole_file(tmp_path) -> None:
    p = tmp_path / "sub" / "f.txt"
    write_text(p, "one")
    write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_last_good_state(tmp_path) -> None:
    p = tmp_path / "f.json"
    write_json(p, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write('{"a": 2, "half')
        raise RuntimeError("killed mid-write")
    assert p.read_text().strip().startswith('{\n  "a": 1')
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_only_write_modes(tmp_path) -> None:
    with pytest.raises(ValueError, match="Received: mode='a'"), atomic_open(tmp_path / "x", "a"):
        pass


def test_exclusive_write_never_replaces(tmp_path) -> None:
    path = tmp_path / "manifest.json"
    write_json(path, {"n": 1}, exclusive=True)
    with pytest.raises(FileExistsError):
        write_json(path, {"n": 2}, exclusive=True)
    assert path.read_text(encoding="utf-8") == '{\n  "n": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left
