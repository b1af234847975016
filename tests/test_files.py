"""Atomic writes: an exception mid-write leaves the old file and no temp file behind."""

from __future__ import annotations

import pytest

from convlens.errors import DiskFullError
from convlens.files import atomic_open, write_bytes, write_json, write_text


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


# ----------------------------------------------------------------------------- a full disk
def test_a_write_that_cannot_fit_is_refused_before_writing(small_disk) -> None:
    disk = small_disk("1m")
    p = disk / "model.bin"
    write_bytes(p, b"a" * 300_000)
    with pytest.raises(DiskFullError) as e:
        write_bytes(p, b"b" * 2_000_000)
    msg = str(e.value)
    assert "\n" not in msg and str(disk) in msg and "needs 1.9 MB" in msg and "free" in msg, msg
    assert e.value.needed == 2_000_000 and e.value.free is not None and e.value.free < 2_000_000
    assert p.read_bytes() == b"a" * 300_000  # the previous file, whole
    assert [x.name for x in disk.iterdir()] == ["model.bin"]  # no partial file


def test_the_disk_filling_during_a_write_keeps_the_old_file(tmp_path, enospc_at) -> None:
    p = tmp_path / "last.pt"
    write_bytes(p, b"old")
    enospc_at(".last.pt.")
    with pytest.raises(DiskFullError, match=r"the disk filled while writing .*last\.pt \(No space left on device, "
                                            r"it needs 3 B, .* free in "):
        write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["last.pt"]


def test_a_real_enospc_is_translated_when_nothing_was_reserved(small_disk, monkeypatch) -> None:
    import errno
    import os

    from convlens import files

    disk = small_disk("1m")
    write_text(disk / "report.html", "old")

    def no_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    # A filesystem without preallocation and a free-space check that was wrong: the kernel's ENOSPC.
    monkeypatch.setattr(os, "posix_fallocate", no_fallocate, raising=False)
    monkeypatch.setattr(files, "ensure_space", lambda *a, **k: None)
    with pytest.raises(DiskFullError, match="the disk filled while writing"):
        write_text(disk / "report.html", "x" * 3_000_000)
    assert (disk / "report.html").read_text() == "old"
    assert [x.name for x in disk.iterdir()] == ["report.html"]


def test_reserve_without_fallocate_zero_fills_only_what_will_be_mapped(tmp_path, monkeypatch) -> None:
    import errno
    import os

    from convlens.files import reserve

    def no_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate, raising=False)
    with open(tmp_path / "a.npy", "wb") as f:
        f.write(b"head")
        reserve(f, 3_000_000, tmp_path / "a.npy", zero_fill=True)
        assert f.tell() == 4  # the position is kept
    assert (tmp_path / "a.npy").stat().st_size == 3_000_000
    write_bytes(tmp_path / "b.bin", b"exact")  # no preallocation: the size is what was written
    assert (tmp_path / "b.bin").read_bytes() == b"exact"


def test_sized_text_writes_keep_their_exact_bytes(tmp_path) -> None:
    text = "naïve ✓\nline two\n"
    write_text(tmp_path / "t.txt", text)
    write_json(tmp_path / "t.json", {"k": "é"})
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == text
    assert (tmp_path / "t.json").read_text(encoding="utf-8") == '{\n  "k": "\\u00e9"\n}\n'
