"""Acting on an audit without losing data: quarantine chosen files, or move files between class
folders, through :mod:`convlens.data.moves` (a taken name gets a free one, the manifest records
both, ``--undo`` puts everything back)."""

from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path
from typing import Any

from convlens.data.moves import MoveReport, quarantine_files, relabel_files
from convlens.data.scan import scan
from convlens.errors import DataError


def read_csv(path: str, need: tuple[str, ...], flag: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header (the audit's ``--csv`` or any file with these columns), each
    with ``_line``: the line of the file it ends on."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            # _line: the line each row ends on (read after the row), for errors that name the row
            rows = [{**{k: (v or "").strip() for k, v in r.items() if isinstance(k, str) and k},
                     "_line": str(reader.line_num)} for r in reader]
            header = reader.fieldnames or []
    except FileNotFoundError as e:
        raise DataError(f"CSV file not found. Received: {flag} {path!r}") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the CSV file ({e}). Received: {flag} {path!r}") from e
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"the CSV file needs the column(s) {', '.join(missing)} (as written by `convlens audit "
                        f"--csv`); it has {', '.join(header) or 'none'}. Received: {flag} {path!r}")
    return rows


def _row_error(r: dict[str, str], csv_path: str, flag: str, what: str) -> DataError:
    return DataError(f"row {r['_line']} of {csv_path}: {what}; nothing was moved. Fix or delete the row. "
                     f"Received: {flag} {csv_path!r}")


def quarantine_listed(root: str, csv_path: str, qdir: str) -> MoveReport:
    """Move every file listed in the CSV's ``path`` column (relative to ``root``) into ``qdir``."""
    index = scan(root)
    rows = read_csv(csv_path, ("path",), "--paths")
    known = {e.rel for e in index.entries}
    files: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["path"]:
            continue
        if r["path"] not in known:
            raise _row_error(r, csv_path, "--paths", f"{r['path']!r} is not an image of {index.root}")
        files.setdefault(r["path"], {"path": r["path"], "kind": r.get("finding") or "listed",
                                     "message": f"listed in {csv_path}"})
    return quarantine_files(index.root, list(files.values()), qdir, flag="--quarantine", verb="audit")


def relabel_moves(root: str, rows: list[dict[str, str]], csv_path: str) -> tuple[Path, list[dict[str, Any]]]:
    """Where each listed file goes: the same place under its ``new_class`` folder (rows with an
    empty ``new_class`` or already in that class are skipped). Every row is checked before
    anything moves."""
    index = scan(root)
    by_rel = {e.rel: e for e in index.entries}
    moves: dict[str, dict[str, Any]] = {}
    asked: dict[str, str] = {}  # path -> new_class of its first row
    for r in rows:
        rel, new = r["path"], r["new_class"]
        if not rel or not new:
            continue
        e = by_rel.get(rel)
        if e is None:
            raise _row_error(r, csv_path, "--relabel", f"{rel!r} is not an image of {index.root}")
        if new in (".", "..") or "/" in new or "\\" in new:
            raise _row_error(r, csv_path, "--relabel", f"new_class {new!r} is not a class name (one folder name, "
                             f"one of {', '.join(index.classes)})")
        if new not in index.classes:
            raise _row_error(r, csv_path, "--relabel", f"{new!r} is not a class of {index.root} "
                             f"({', '.join(index.classes)})")
        if asked.setdefault(rel, new) != new:
            raise _row_error(r, csv_path, "--relabel", f"{rel!r} is listed again with another new_class "
                             f"({asked[rel]!r}, then {new!r})")
        if new == e.class_name:
            continue
        parts = rel.split("/")
        k = 1 if e.subset else 0  # DIR/<class>/... or DIR/<subset>/<class>/...
        parts[k] = new
        moves[rel] = {"path": rel, "to": "/".join(parts), "tag": e.class_name, "kind": "relabel",
                      "message": f"{e.class_name} -> {new}"}
    return index.root, list(moves.values())


def relabel_from_csv(root: str, csv_path: str, manifest: str | None = None) -> MoveReport | None:
    """Move the files of the CSV's rows (``path``, ``new_class``) into their new class folders
    (``None`` when no row asks for a move). The manifest goes beside the CSV (a new file each
    time) unless ``manifest`` names one."""
    rows = read_csv(csv_path, ("path", "new_class"), "--relabel")
    dataset, moves = relabel_moves(root, rows, csv_path)
    if not moves:
        return None
    if manifest is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = Path(csv_path).resolve().parent / f"convlens-relabel-{stamp}"
        candidate, n = base.with_suffix(".json"), 2
        while candidate.exists():
            candidate, n = Path(f"{base}-{n}.json"), n + 1
        manifest = str(candidate)
    return relabel_files(dataset, moves, manifest, verb="audit")
