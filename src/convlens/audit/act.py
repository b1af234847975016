"""Acting on an audit without losing data: quarantine chosen files, or move files between class
folders, through :mod:`convlens.data.check`'s manifest (``--undo`` puts everything back)."""

from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path
from typing import Any

from convlens.data.check import quarantine_files, relabel_files
from convlens.data.scan import scan
from convlens.errors import DataError


def read_csv(path: str, need: tuple[str, ...], flag: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header (the audit's ``--csv`` or any file with these columns)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError as e:
        raise DataError(f"CSV file not found. Received: {flag} {path!r}") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the CSV file ({e}). Received: {flag} {path!r}") from e
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"the CSV file needs the column(s) {', '.join(missing)} (as written by `convlens audit "
                        f"--csv`); it has {', '.join(header) or 'none'}. Received: {flag} {path!r}")
    return [{k: (v or "").strip() for k, v in r.items() if k} for r in rows]


def quarantine_listed(root: str, csv_path: str, qdir: str) -> tuple[Path, int]:
    """Move every file listed in the CSV's ``path`` column (relative to ``root``) into ``qdir``."""
    index = scan(root)
    rows = read_csv(csv_path, ("path",), "--paths")
    known = {e.rel for e in index.entries}
    files: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["path"]:
            continue
        if r["path"] not in known:
            raise DataError(f"{r['path']!r} is not an image of {index.root}; nothing was moved. "
                            f"Received: --paths {csv_path!r}")
        files.setdefault(r["path"], {"path": r["path"], "kind": r.get("finding") or "listed",
                                     "message": f"listed in {csv_path}"})
    return quarantine_files(index.root, list(files.values()), qdir), len(files)


def relabel_moves(root: str, rows: list[dict[str, str]], csv_path: str) -> tuple[Path, list[dict[str, Any]]]:
    """Where each listed file goes: the same place under its ``new_class`` folder (rows with an
    empty ``new_class`` or already in that class are skipped)."""
    index = scan(root)
    by_rel = {e.rel: e for e in index.entries}
    moves: dict[str, dict[str, Any]] = {}
    for r in rows:
        rel, new = r["path"], r["new_class"]
        if not rel or not new:
            continue
        e = by_rel.get(rel)
        if e is None:
            raise DataError(f"{rel!r} is not an image of {index.root}; nothing was moved. Received: --relabel {csv_path!r}")
        if new not in index.classes:
            raise DataError(f"{new!r} is not a class of {index.root} ({', '.join(index.classes)}); nothing was moved. "
                            f"Received: --relabel {csv_path!r}")
        if new == e.class_name:
            continue
        parts = rel.split("/")
        k = 1 if e.subset else 0  # DIR/<class>/... or DIR/<subset>/<class>/...
        parts[k] = new
        moves[rel] = {"path": rel, "to": "/".join(parts), "kind": "relabel",
                      "message": f"{e.class_name} -> {new}"}
    return index.root, list(moves.values())


def relabel_from_csv(root: str, csv_path: str, manifest: str | None = None) -> tuple[Path | None, int]:
    """Move the files of the CSV's rows (``path``, ``new_class``) into their new class folders.
    The manifest goes beside the CSV (a new file each time) unless ``manifest`` names one."""
    rows = read_csv(csv_path, ("path", "new_class"), "--relabel")
    dataset, moves = relabel_moves(root, rows, csv_path)
    if not moves:
        return None, 0
    if manifest is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = Path(csv_path).resolve().parent / f"convlens-relabel-{stamp}"
        candidate, n = base.with_suffix(".json"), 2
        while candidate.exists():
            candidate, n = Path(f"{base}-{n}.json"), n + 1
        manifest = str(candidate)
    return relabel_files(dataset, moves, manifest), len(moves)
