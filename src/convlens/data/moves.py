"""Moving a user's photos without losing one: quarantine, relabel and ``--undo``, through a manifest.

The rules, for ``check --quarantine``, ``audit --quarantine`` and ``audit --relabel`` alike:

- no move replaces a file: a taken name gets a free one, chosen deterministically
  (``4085.jpg`` -> ``4085-from-Cat.jpg``, then ``4085-from-Cat-2.jpg``, ...), and the manifest
  records both names;
- nothing is deleted or re-encoded; a move across filesystems copies to a temporary name, checks
  the copy's size and SHA-256 against the source, and only then removes the source (a failed copy,
  e.g. a full disk, is removed and the source stays);
- every check that can refuse (paths, writability, the manifest) runs before the first move;
- the manifest is written (atomically) before the first move, so a killed run can still be undone,
  and rewritten after the last one to list exactly the files that moved, with their size and hash;
- ``--undo`` moves every file back under its original name, reports each one it cannot restore
  (moved, changed or its place taken since) and restores all the others; a second undo is harmless.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens import files as cio
from convlens.errors import DataError, DiskFullError

MANIFEST_NAME = "convlens-quarantine.json"
MANIFEST_VERSION = 2  # 2: every entry has ``to``, ``renamed``, ``size`` and ``sha256``


# ----------------------------------------------------------------------------- one file
def fingerprint(path: Path) -> tuple[int, str]:
    """``(size, sha256)`` of a file; the hash is ``""`` when the file cannot be read (a file
    ``check`` found unreadable can still be moved by name)."""
    size = os.stat(path).st_size
    try:
        return size, cio.file_sha256(path)
    except PermissionError:
        return size, ""


def free_name(dst: Path, tag: str, taken: set[Path]) -> Path:
    """``dst`` when no file has that name (on disk or in ``taken``), else the first free of
    ``<stem>-from-<tag><ext>``, ``<stem>-from-<tag>-2<ext>``, ..."""
    def free(p: Path) -> bool:
        return p not in taken and not (p.exists() or p.is_symlink())

    n = 1
    candidate = dst
    while not free(candidate):
        candidate = dst.with_name(f"{dst.stem}-from-{tag}{'' if n == 1 else f'-{n}'}{dst.suffix}")
        n += 1
    return candidate


def move_file(src: Path, dst: Path, sha256: str = "") -> None:
    """Move ``src`` to ``dst``; never replaces a file at ``dst`` (``FileExistsError``).

    Same filesystem: a hard link, then the old name is removed (atomic). Otherwise
    :func:`_copy_verified` (``sha256``, when known, is what the copy must hash to)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as e:  # FileExistsError (EEXIST) is raised; no hard link here: copy instead
        if e.errno not in cio.NO_HARD_LINK:
            raise
        _copy_verified(src, dst, sha256)
        return
    _drop_source(src, dst)


def _drop_source(src: Path, dst: Path) -> None:
    """Remove the old name once ``dst`` holds the file; if that fails, remove ``dst`` instead
    (our link or verified copy), so exactly one copy, the user's original, remains."""
    try:
        os.unlink(src)
    except OSError:
        os.unlink(dst)
        raise


def _copy_verified(src: Path, dst: Path, sha256: str) -> None:
    """Copy ``src`` to a temporary name beside ``dst``, check the copy's size and hash, name it
    ``dst`` (never over a file), then remove ``src``. On any failure (a full disk, a source that
    changed meanwhile) the partial copy is removed and ``src`` is untouched."""
    before = os.stat(src)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fo, open(src, "rb") as fi:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        shutil.copystat(src, tmp)
        after = os.stat(src)
        same_source = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        # One hash, of the copy, against the source's hash from the plan (so a source changed
        # since then fails here too); only a manifest without hashes (version 1) hashes the source.
        if not same_source or os.path.getsize(tmp) != before.st_size \
                or cio.file_sha256(tmp) != (sha256 or cio.file_sha256(src)):
            raise OSError(errno.EIO, "the copy does not match the source (did it change meanwhile?)", str(dst))
        cio.link_new(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _drop_source(src, dst)


# ----------------------------------------------------------------------------- results
@dataclass
class MoveReport:
    """What a quarantine or relabel did. ``moved`` holds the manifest entries of the files that
    moved: ``path`` (the old place, relative to the dataset), ``to`` (relative to ``destination``:
    the quarantine folder, or the dataset for a relabel) and ``renamed`` (the name was taken)."""

    action: str
    dataset: Path
    destination: Path
    manifest: Path
    moved: list[dict[str, Any]] = field(default_factory=list)

    @property
    def renamed(self) -> list[dict[str, Any]]:
        return [m for m in self.moved if m["renamed"]]

    def new_path(self, entry: dict[str, Any]) -> Path:
        return self.destination / entry["to"]

    def lines(self) -> list[str]:
        """One line per moved file: ``cats/1.jpg -> /q/cats/1.jpg`` (``(renamed: ...)`` when it was)."""
        return [f"  {m['path']} -> {self.new_path(m)}"
                + (f" (renamed: {Path(m['to']).parent / Path(m['path']).name} was taken)" if m["renamed"] else "")
                for m in self.moved]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` ``moves`` section."""
        return {"action": self.action, "dataset": str(self.dataset), "destination": str(self.destination),
                "manifest": str(self.manifest), "renamed": len(self.renamed),
                "moved": [{"path": m["path"], "to": m["to"], "new_path": str(self.new_path(m)),
                           "renamed": m["renamed"]} for m in self.moved]}


def print_moves(moves: MoveReport, console: Any, what: str, verb: str) -> None:
    """The console's account of a move: a summary with the undo command, then each file's new place."""
    renamed = f" ({len(moves.renamed)} renamed: their names were taken)" if moves.renamed else ""
    summary = f"moved {len(moves.moved)} {what}{renamed}; undo with `convlens {verb} --undo {moves.manifest}`"
    for line in [summary, *moves.lines()]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@dataclass
class UndoReport:
    """What ``--undo`` did: ``restored`` (original paths), ``in_place`` (already back, or never
    moved) and ``failed`` (``(path, reason)`` for each file it could not restore)."""

    manifest: Path
    restored: list[str] = field(default_factory=list)
    in_place: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: everything is back; 1: some files could not be restored (each is named)."""
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        out = [f"restored {len(self.restored)} file(s) to their original places"
               + (f"; {len(self.in_place)} already there" if self.in_place else "")]
        out += [f"could not restore {rel}: {why}" for rel, why in self.failed]
        if self.failed:
            out.append(f"{len(self.failed)} file(s) not restored (named above; the manifest keeps them): "
                       f"fix what is said, then run --undo {self.manifest} again")
        return out

    def print_to(self, console: Any) -> int:
        """:meth:`lines` on ``console``, verbatim (``check --undo`` and ``audit --undo``); the exit code."""
        for line in self.lines():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return self.exit_code


# ----------------------------------------------------------------------------- quarantine / relabel
def _check_relative(root: Path, rels: list[str], received: str) -> None:
    """Every path must name a file inside ``root`` (no ``..``, no absolute paths)."""
    for rel in rels:
        bad = not isinstance(rel, str) or rel in ("", ".") or Path(rel).is_absolute()
        if bad or not (root / rel).resolve().is_relative_to(root.resolve()):
            raise DataError(f"{rel!r} is not a file inside the folder {root}; paths are relative to it. "
                            f"Received: {received}")


def quarantine_files(root: str | os.PathLike[str], files: list[dict[str, Any]],
                     qdir: str | os.PathLike[str], flag: str = "--quarantine", verb: str = "check") -> MoveReport:
    """Move ``files`` (dicts with ``path`` relative to ``root`` and any JSON-safe details, e.g.
    ``kind`` and ``message``) into ``qdir`` at the same relative paths; a taken name gets
    ``-from-<folder>`` (:func:`free_name`). Used by ``check`` (unusable files) and ``audit``
    (chosen findings); :func:`undo_quarantine` reads the manifest ``qdir/convlens-quarantine.json``."""
    root = Path(root).resolve()
    qdir = Path(qdir).expanduser().resolve()
    received = f"{flag} {str(qdir)!r}"
    if qdir.is_relative_to(root):
        raise DataError(f"the quarantine folder must be outside the dataset folder {root}. Received: {received}")
    manifest = qdir / MANIFEST_NAME
    old: list[dict[str, Any]] = []
    if manifest.exists():
        data = read_manifest(manifest)
        if data["dataset"] != str(root):
            raise DataError(f"{qdir} already holds files quarantined from {data['dataset']}; choose another folder. "
                            f"Received: {received}")
        old = data["files"]
    items = [{**f, "to": f["path"], "tag": Path(f["path"]).parent.name or root.name} for f in files]
    return _execute("quarantine", root, qdir, _plan(root, qdir, items, received), manifest, old, received, verb)


def relabel_files(root: str | os.PathLike[str], moves: list[dict[str, Any]],
                  manifest: str | os.PathLike[str], verb: str = "audit") -> MoveReport:
    """Move files between class folders inside ``root``: each dict has ``path`` (where the file
    is) and ``to`` (where it goes), both relative to ``root``, optionally ``tag`` (the source's
    class, the suffix of a renamed file) and any details. Writes ``manifest`` (a new file; never
    replaced) before moving; :func:`undo_quarantine` moves them back."""
    root = Path(root).resolve()
    manifest = Path(manifest).expanduser().resolve()
    _check_relative(root, [m["to"] for m in moves], "--relabel")
    items = [{**m, "tag": m.get("tag") or Path(m["path"]).parent.name} for m in moves]
    plan = _plan(root, root, items, "--relabel")
    missing = sorted({m["path"] for m in moves} - {p["path"] for p in plan})
    if missing:
        raise DataError(f"{len(missing)} file(s) to relabel are not in the dataset (e.g. {missing[0]}); "
                        f"nothing was moved. Received: --relabel")
    return _execute("relabel", root, root, plan, manifest, [], "--relabel", verb, exclusive=True)


def _plan(root: Path, dest: Path, items: list[dict[str, Any]], received: str) -> list[dict[str, Any]]:
    """The manifest entry of every move, in order: the target name (a free one when taken), the
    source's size and hash. Files that vanished since the scan are left out; a repeated path once."""
    _check_relative(root, [i["path"] for i in items], received)
    taken: set[Path] = set()
    plan, seen = [], set()
    for item in items:
        src = root / item["path"]
        if item["path"] in seen or not src.is_file():
            continue
        seen.add(item["path"])
        want = dest / item["to"]
        target = free_name(want, item["tag"], taken)
        taken.add(target)
        try:
            size, sha = fingerprint(src)
        except FileNotFoundError:
            continue
        entry = {k: v for k, v in item.items() if k != "tag"}
        entry.update(to=target.relative_to(dest).as_posix(), renamed=target != want, size=size, sha256=sha)
        plan.append(entry)
    return plan


def _check_writable(dirs: set[Path], received: str) -> None:
    """Refuse before moving anything when a folder a move needs is read-only (or not ours)."""
    for d in sorted({cio.nearest_existing(d) for d in dirs}):
        if not os.access(d, os.W_OK | os.X_OK):
            raise DataError(f"cannot move files: {d} is read-only (or not writable by you); nothing was moved. "
                            f"Make it writable or copy the dataset first. Received: {received}")


def _write_manifest(manifest: Path, data: dict[str, Any], received: str, exclusive: bool = False) -> None:
    try:
        cio.write_json(manifest, data, exclusive=exclusive)
    except FileExistsError as e:
        raise DataError(f"the manifest {manifest} exists already; choose another name. Received: {received}") from e
    except (OSError, DiskFullError) as e:  # convlens.files turns ENOSPC into DiskFullError
        free = cio.free_bytes(manifest.parent)
        raise DataError(f"cannot write the manifest {manifest}: {_reason(e)} ({cio.human_bytes(free)} free "
                        f"there); nothing was moved. Received: {received}") from e


def _reason(e: Exception) -> str:
    """What went wrong, in a few words: an OSError's own text, or a DiskFullError's line."""
    return str(getattr(e, "strerror", None) or e)


@contextlib.contextmanager
def _reserved(manifest: Path, nbytes: int) -> Any:
    """Hold ``nbytes`` beside the manifest while files move, so that its final rewrite fits even
    when the moves fill that disk. Where the space cannot be held, the moves go on unreserved: the
    first manifest still undoes them (--undo skips entries whose file never moved)."""
    path = manifest.parent / f".{manifest.name}.reserve"
    try:
        with open(path, "wb") as f:
            cio.reserve(f, nbytes, path, zero_fill=True)  # posix_fallocate, or zeros where there is none
    except (OSError, DiskFullError):
        path.unlink(missing_ok=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _execute(action: str, root: Path, dest: Path, plan: list[dict[str, Any]], manifest: Path,
             old: list[dict[str, Any]], received: str, verb: str, exclusive: bool = False) -> MoveReport:
    """Pre-flight, manifest (after the ``old`` entries of earlier runs), moves, manifest again; one
    line (``DataError``) when a move fails."""
    dirs = {manifest.parent} | {(root / p["path"]).parent for p in plan} | {(dest / p["to"]).parent for p in plan}
    _check_writable(dirs, received)
    data = {"version": MANIFEST_VERSION, "action": action, "dataset": str(root),
            "quarantine": str(dest) if action == "quarantine" else None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    undo_cmd = f"convlens {verb} --undo {manifest}"
    _write_manifest(manifest, {**data, "files": old + plan}, received, exclusive)
    moved: list[dict[str, Any]] = []
    failure: tuple[dict[str, Any], OSError] | None = None
    with _reserved(manifest, manifest.stat().st_size + 4096):
        for entry in plan:
            try:
                move_file(root / entry["path"], dest / entry["to"], entry["sha256"])
            except FileNotFoundError:
                continue  # vanished since the plan: nothing moved, nothing to undo
            except OSError as e:
                failure = (entry, e)
                break
            moved.append(entry)
    try:
        cio.write_json(manifest, {**data, "files": old + moved})
    except (OSError, DiskFullError) as e:
        raise DataError(f"moved {len(moved)} of {len(plan)} file(s) but could not update the manifest {manifest} "
                        f"({_reason(e)}); it still lists every planned file and `{undo_cmd}` restores those "
                        f"that moved. Received: {received}") from e
    if failure:
        raise DataError(_failure_line(failure[0], failure[1], dest, len(moved), len(plan), undo_cmd, received))
    return MoveReport(action, root, dest, manifest, moved)


def _failure_line(entry: dict[str, Any], e: OSError, dest: Path, done: int, total: int, undo_cmd: str,
                  received: str) -> str:
    target = dest / entry["to"]
    what = "nothing was moved" if not done else (f"moved {done} of {total} file(s), the others are untouched; "
                                                 f"undo with `{undo_cmd}`")
    return (f"could not move {entry['path']} to {target}: {e.strerror or e} ({_room(target.parent)}); the file "
            f"is still in place and no partial copy is left; {what}. Received: {received}")


def _room(folder: Path) -> str:
    """``"12.3 MB free in /q"``: the space left where a move failed (``folder`` may not exist yet)."""
    return f"{cio.human_bytes(cio.free_bytes(folder))} free in {cio.nearest_existing(folder)}"


# ----------------------------------------------------------------------------- undo
def read_manifest(path: Path) -> dict[str, Any]:
    """A quarantine or relabel manifest, checked for its keys; ``DataError`` otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and isinstance(data.get("dataset"), str) and isinstance(data.get("files"), list)
                and all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in data["files"])):
            raise ValueError("missing keys")
    except FileNotFoundError as e:
        raise DataError(f"quarantine manifest not found. Received: {str(path)!r}") from e
    except (ValueError, OSError) as e:
        raise DataError(f"not a convlens quarantine manifest ({e}). Received: {str(path)!r}") from e
    return data


def _why_not(f: dict[str, Any], src: Path, dst: Path) -> str | None:
    """Why the file of entry ``f`` (now at ``src``) cannot go back to ``dst``; ``"in place"``
    when it is there already (restored before, or never moved); None when it can."""
    size, sha = f.get("size"), f.get("sha256")
    if not src.exists():
        if dst.is_file() and (not sha or fingerprint(dst) == (size, sha)):
            return "in place"
        return (f"it is no longer at {src} (moved or deleted since)"
                + (f", and {dst} holds a different file" if dst.exists() else ""))
    if sha and fingerprint(src) != (size, sha):
        return f"{src} changed since it was moved (size or content differ from the manifest); move it back by hand"
    if dst.exists() or dst.is_symlink():
        return f"{dst} holds a file again; move that one away first"
    return None


def undo_quarantine(manifest_path: str | os.PathLike[str]) -> UndoReport:
    """Move every quarantined (or relabelled) file back under its original name.

    Files that moved, changed or whose original place is taken since are reported (with the
    reason) and stay in the manifest; all the others are restored, the latest move first.
    Running it again is harmless."""
    manifest = Path(manifest_path).expanduser()
    if manifest.is_dir():
        manifest = manifest / MANIFEST_NAME
    data = read_manifest(manifest)
    root = Path(data["dataset"])
    dest = root if data.get("action") == "relabel" else Path(data.get("quarantine") or manifest.parent)
    received = f"--undo {str(manifest)!r}"
    entries = data["files"]
    _check_relative(root, [f["path"] for f in entries], received)
    _check_relative(dest, [f.get("to") or f["path"] for f in entries], received)  # version 1: same path
    _check_writable({(root / f["path"]).parent for f in entries}, received)
    report, keep = UndoReport(manifest), []
    for f in reversed(entries):  # the latest move first: a path quarantined twice gets its latest file back
        src, dst = dest / (f.get("to") or f["path"]), root / f["path"]
        why = _why_not(f, src, dst)
        if why is None:
            try:
                move_file(src, dst, f.get("sha256", ""))
            except OSError as e:
                why = f"{e.strerror or e} ({_room(dst.parent)})"
        if why is None:
            report.restored.append(f["path"])
            if dest != root:
                _remove_empty_dirs(src.parent, dest)
        elif why == "in place":
            report.in_place.append(f["path"])
        else:
            report.failed.append((f["path"], why))
            keep.append(f)
    for done in (report.restored, report.in_place, report.failed):
        done.reverse()  # back to manifest order
    if keep != entries[::-1]:
        data["files"] = keep[::-1]
        data["restored"] = data.get("restored", []) + report.restored
        try:
            cio.write_json(manifest, data)
        except (OSError, DiskFullError) as e:
            raise DataError(f"restored {len(report.restored)} file(s) but could not update the manifest {manifest} "
                            f"({_reason(e)}); running --undo again is harmless. Received: {received}") from e
    return report


def _remove_empty_dirs(d: Path, top: Path) -> None:
    """Remove now-empty folders a quarantine created under ``top`` (never anything else)."""
    while d != top and d.is_relative_to(top):
        try:
            d.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): stop climbing
        d = d.parent
