"""The ``convlens audit`` verb: audit, write the chosen outputs, act when asked."""

from __future__ import annotations

from typing import Any

from convlens.audit import DEFAULT_BACKBONE, KINDS, audit_dataset
from convlens.audit.findings import DEFAULT_DUPLICATE_SIMILARITY, DEFAULT_FOLDS
from convlens.display import shows_progress
from convlens.errors import ConfigError


def parse_kinds(text: str | None) -> list[str]:
    """``"label,outlier"`` -> ``["label", "outlier"]``; ``all`` is every kind."""
    if not text:
        return []
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if kinds == ["all"]:
        return list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"--kinds takes {', '.join(KINDS)} or all, separated by commas. Received: --kinds {text!r}")
    return kinds


def _check_options(dir: str | None, quarantine_dir: str | None, kinds: list[str], paths: str | None,
                   relabel: str | None, undo: str | None) -> None:
    if undo and (quarantine_dir or relabel or paths or kinds):
        raise ConfigError(f"--undo runs alone; drop the other actions. Received: --undo {undo!r}")
    if relabel and (quarantine_dir or paths or kinds):
        raise ConfigError(f"use either --relabel or --quarantine, not both. Received: --relabel {relabel!r}")
    if quarantine_dir and not (kinds or paths):
        raise ConfigError("--quarantine needs what to move: --kinds label,duplicate,outlier (or all) or --paths "
                          f"FILE.csv. Received: --quarantine {quarantine_dir!r}")
    if quarantine_dir and kinds and paths:
        raise ConfigError(f"use either --kinds or --paths with --quarantine, not both. Received: --paths {paths!r}")
    if (kinds or paths) and not quarantine_dir:
        raise ConfigError("--kinds and --paths choose what --quarantine QDIR moves; add --quarantine QDIR")
    if not dir and not undo:
        raise ConfigError("audit needs a dataset folder: `convlens audit DIR`. Received: DIR=None")


def audit_command(dir: str | None, *, json_path: str | None = None, html_path: str | None = None,
                  csv_path: str | None = None, backbone: str | None = None, folds: int | None = None,
                  similarity: float | None = None, cache_dir: str | None = None,
                  workers: int = 0, top: int = 10, quarantine_dir: str | None = None, kinds: str | None = None,
                  paths: str | None = None, relabel: str | None = None, undo: str | None = None,
                  features_fn: Any = None) -> int:
    """``convlens audit``. Returns 0 (no findings), 1 (findings); raises UserError (exit 2).
    ``None`` options take the library defaults."""
    from rich.console import Console

    from convlens import files as cio
    from convlens.audit import act, output
    from convlens.data.moves import print_moves, quarantine_files, undo_quarantine

    console = Console()
    chosen = parse_kinds(kinds)
    _check_options(dir, quarantine_dir, chosen, paths, relabel, undo)
    if undo:
        return undo_quarantine(undo).print_to(console)
    assert dir is not None
    if relabel or paths:
        moves = act.relabel_from_csv(dir, relabel) if relabel else act.quarantine_listed(dir, str(paths), str(quarantine_dir))
        if moves is None:
            console.print("no row asks for a move (empty new_class, or already in that class): nothing moved")
        else:
            print_moves(moves, console, "file(s) to their new class folders" if relabel
                        else f"listed file(s) to {moves.destination}", "audit")
        if json_path:  # the moves are the whole result of this run
            cio.write_json(json_path, {"moves": moves.to_dict() if moves else None})
            console.print(f"written: {json_path}", markup=False, soft_wrap=True)
        return 0
    report = audit_dataset(dir, backbone=backbone or DEFAULT_BACKBONE, folds=DEFAULT_FOLDS if folds is None else folds,
                           similarity=DEFAULT_DUPLICATE_SIMILARITY if similarity is None else similarity,
                           cache_dir=cache_dir,
                           workers=workers, progress=shows_progress(), features_fn=features_fn)
    output.print_report(report, console, top=top)
    moves = None
    try:
        files = report.chosen(chosen) if quarantine_dir else []
        if files:
            moves = quarantine_files(report.root, files, quarantine_dir, verb="audit")
            print_moves(moves, console, f"file(s) ({', '.join(chosen)}) to {moves.destination}", "audit")
        elif quarantine_dir:
            console.print(f"no {', '.join(chosen)} findings: nothing moved")
    finally:  # written once, even when a move fails; with the moves, the page says where each photo went
        moved = moves.to_dict() if moves else None
        for path, write in ((json_path, lambda p: cio.write_json(p, {**report.to_dict(),
                                                                     **({"moves": moved} if moved else {})})),
                            (csv_path, lambda p: cio.write_text(p, output.findings_csv(report))),
                            (html_path, lambda p: cio.write_text(p, output.render_page(
                                report, {m["path"]: m["new_path"] for m in moved["moved"]} if moved else None)))):
            if path:
                write(path)
                console.print(f"written: {path}", markup=False, soft_wrap=True)
    return report.exit_code
