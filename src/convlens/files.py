"""Atomic file writing: a kill at any moment leaves either the old file or the new one.

Disk space is owned here too: a write that knows its size checks the free space and reserves
its blocks (:func:`reserve`) before writing, and a full disk during any write (ENOSPC) becomes a
one-line :class:`~convlens.errors.DiskFullError` with the temporary file removed and the previous
file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from convlens.errors import DiskFullError

# What a full disk (or a full quota) says when a write fails.
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
# What posix_fallocate says when the filesystem cannot preallocate (then: check, and zero-fill maps).
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
DEFAULT_DISK_HINT = "free some space, or write to a folder on a disk with room"
_ZERO_CHUNK = 1 << 20
# What os.link says when there is no hard link to be had (another filesystem, or none supported).
NO_HARD_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})


# The process's umask, for the permissions of new files (reading it means setting it: set it back).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def human_bytes(n: float) -> str:
    """``123456789`` -> ``'117.7 MB'``."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path``, or its nearest parent that exists (a folder a write will make may not yet)."""
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def free_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes a normal user may still write on the filesystem of ``folder`` (or of its nearest
    existing parent: the folder may not be made yet)."""
    return shutil.disk_usage(nearest_existing(folder)).free


def ensure_space(folder: str | os.PathLike[str], needed: int, what: object = None,
                 hint: str = DEFAULT_DISK_HINT) -> None:
    """A :class:`DiskFullError` naming ``folder`` when it has fewer than ``needed`` bytes free
    (``what``: the file or a description of what needs them, for the message)."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(f"not enough disk space for {what or folder}: it needs {human_bytes(needed)} "
                            f"and {folder} has {human_bytes(free)} free", hint,
                            path=str(folder), needed=needed, free=free)


def disk_full(error: OSError, path: str | os.PathLike[str], needed: int | None = None,
              hint: str = DEFAULT_DISK_HINT) -> DiskFullError:
    """The one-line error of a write of ``path`` that failed with ENOSPC/EDQUOT."""
    folder = Path(path).parent
    try:
        free: int | None = free_bytes(folder)
    except OSError:  # the folder itself is gone: the error still names the file
        free = None
    room = f"{human_bytes(free)} free in {folder}" if free is not None else f"in {folder}"
    size = f", it needs {human_bytes(needed)}" if needed is not None else ""
    return DiskFullError(f"the disk filled while writing {path} ({error.strerror or 'no space left'}{size}, {room})",
                         hint, path=str(path), needed=needed, free=free)


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike[str], needed: int | None = None) -> Iterator[None]:
    """Inside: an ``OSError`` of a full disk or quota becomes a :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full(e, path, needed) from e
        raise


def reserve(f: IO[Any], size: int, path: str | os.PathLike[str], zero_fill: bool = False,
            what: object = None) -> None:
    """Give the open file ``f`` (``path``) ``size`` bytes of disk blocks before its data is written.

    ``posix_fallocate`` makes the blocks real, so a full disk is an error here and not a SIGBUS
    when a memory map of the file is written later. Where the filesystem cannot preallocate, the
    free space is checked and, with ``zero_fill`` (for files that will be memory-mapped), the
    missing bytes are written as zeros. The file's position is unchanged; its size becomes ``size``.
    ``what``: what the message calls the file (default: ``path``).
    """
    f.flush()
    fd = f.fileno()
    have = os.fstat(fd).st_size
    if size <= have:
        return
    # Refused before any block is taken, naming what is free (the only check where nothing preallocates).
    ensure_space(Path(path).parent, size - have, what or path)
    with disk_full_as_error(path, size):
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(fd, 0, size)
                return
            except OSError as e:
                if e.errno not in _NO_FALLOCATE:
                    raise
        if zero_fill:
            pos = f.tell()
            f.seek(have)
            for start in range(have, size, _ZERO_CHUNK):
                f.write(bytes(min(_ZERO_CHUNK, size - start)))
            f.flush()
            f.seek(pos)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", exclusive: bool = False,
                size: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched; a full disk is a
    :class:`DiskFullError` naming ``path``. ``exclusive``: never replace an existing ``path``
    (``FileExistsError``), e.g. a manifest that can undo moves. ``size``: the exact number of
    bytes the caller will write, in order; its space is checked and reserved first.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb'. Received: mode={mode!r}")
    path = Path(path)
    with disk_full_as_error(path, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            # mkstemp creates 0600; give the result the permissions a plain open() would.
            os.chmod(tmp, 0o666 & ~_UMASK)
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                if size is not None:
                    reserve(f, size, path)
                yield f
                f.flush()
                if size is not None:
                    f.truncate()  # a size that was too large leaves no reserved zeros behind
                os.fsync(f.fileno())
            if exclusive:
                link_new(tmp, path)
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


def link_new(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give the finished file ``tmp`` the name ``path`` only if no file has it (``FileExistsError``
    otherwise; a hard link refuses atomically), then drop the name ``tmp``."""
    path = Path(path)
    try:
        os.link(tmp, path)
    except OSError as e:  # no hard links on this filesystem: check, then rename (EEXIST is raised)
        if e.errno not in NO_HARD_LINK:
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from e
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform/filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path, "wb", size=len(data)) as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str, exclusive: bool = False) -> None:
    """Atomically write ``text`` (UTF-8) to ``path`` (``exclusive``: never over an existing file)."""
    with atomic_open(path, "w", exclusive=exclusive, size=_text_size(text)) as f:
        f.write(text)


def write_json(path: str | os.PathLike[str], obj: Any, exclusive: bool = False) -> None:
    """Atomically write ``obj`` as indented JSON (``exclusive``: never over an existing file)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", exclusive)


def _text_size(text: str) -> int:
    """The bytes ``text`` takes in a file opened with mode ``w`` (UTF-8, newlines translated)."""
    return len(text.encode("utf-8")) + (len(os.linesep) - 1) * text.count("\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
