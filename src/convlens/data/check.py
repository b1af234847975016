"""``convlens check``: fully decode every image, report problems by kind, quarantine with undo.

Each file goes through :func:`convlens.data.decode.decode`, the decoder training uses, so
"usable" here means "training will read it". Nothing in the dataset is ever changed: only
``--quarantine`` moves the unusable files out, through :mod:`convlens.data.moves` (never
overwriting anything), with a manifest that ``--undo`` uses to move them back.
"""

from __future__ import annotations

import functools
import os
import shlex
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convlens import files as cio
from convlens.data.decode import DEFAULT_MAX_PIXELS, ImageInfo, decode
from convlens.data.groups import linked_groups
from convlens.data.moves import MoveReport, print_moves, quarantine_files, undo_quarantine
from convlens.data.parallel import pmap, resolve_workers
from convlens.data.scan import DatasetIndex, ImageEntry, scan
from convlens.errors import ConfigError, ImageError

IMBALANCE_LIMIT = 5.0  # largest / smallest class above this is reported as a problem
NEAR_DUPLICATE_BITS = 6  # perceptual-hash Hamming distance (of 64 bits) counted as "near"
SHOW = 10  # file names shown per row in the terminal (the JSON report has all of them)

UNUSABLE_TEXT = {
    "zero_bytes": "empty file (0 bytes)",
    "not_image": "not an image",
    "truncated": "truncated image data",
    "corrupt": "corrupt image data",
    "unsupported": "unsupported format",
    "too_large": "over the pixel limit",
    "too_small": "smaller than the minimum side",
    "unreadable": "cannot be read",
}
WARNING_TEXT = {
    "ext_mismatch": "extension does not match the content",
    "mode": "non-RGB mode, converted",
    "exif": "EXIF orientation applied",
    "animated": "animated, first frame used",
}


# ----------------------------------------------------------------------------- per file
@dataclass
class FileRecord:
    """What checking one file found: ``info`` is what decoding learned (defaults when unusable).
    ``status`` is ``ok``, ``warning`` or ``unusable``."""

    rel: str
    class_name: str = ""
    subset: str | None = None
    size: int = 0
    mtime_ns: int = 0
    status: str = "ok"
    kind: str = ""  # the ImageError kind when unusable
    message: str = ""
    details: list[str] = field(default_factory=list)  # one readable line per info.warnings entry
    sha256: str = ""
    phash: str = ""
    info: ImageInfo = field(default_factory=lambda: ImageInfo(path=""))

    @property
    def usable(self) -> bool:
        return self.status != "unusable"

    def to_error(self, root: Path) -> ImageError:
        return ImageError(root / self.rel, self.kind, self.message)

    def to_dict(self) -> dict[str, Any]:
        """The flat form the image cache's files.json stores: ``info``'s fields beside the others."""
        d = asdict(self)
        info = d.pop("info")
        del info["path"]
        return {**d, **info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileRecord:
        info = ImageInfo(path=d["rel"], **{k: v for k, v in d.items() if k in ImageInfo.__dataclass_fields__})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__}, info=info)


def _warning_details(info: ImageInfo, rel: str) -> list[str]:
    ext = Path(rel).suffix or "(none)"
    text = {"ext_mismatch": f"content is {info.format} but the name ends in {ext}",
            "mode": f"mode {info.mode} is converted to {'L' if info.grayscale else 'RGB'}",
            "exif": f"EXIF orientation {info.orientation} is applied (turned upright)",
            "animated": f"animated ({info.frames} frames): the first frame is used"}
    return [text[w] for w in info.warnings if w in text]


def inspect_file(path: Path, rel: str, *, max_pixels: int, min_side: int,
                 draft_size: tuple[int, int] | None = None, keep_gray: bool = False,
                 want_phash: bool = False) -> tuple[FileRecord, Any]:
    """Hash and fully decode one file. Returns its record and the decoded image (``None`` when
    unusable). Never raises for a bad image."""
    rec = FileRecord(rel=rel)
    try:
        st = os.stat(path)
        rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
        rec.sha256 = cio.file_sha256(path)
        img, info = decode(path, max_pixels=max_pixels, min_side=min_side, draft_size=draft_size,
                           keep_gray=keep_gray)
    except ImageError as e:
        rec.status, rec.kind, rec.message = "unusable", e.kind, e.message
        return rec, None
    except OSError as e:  # stat/read failures (permissions, a file that vanished)
        rec.status, rec.kind, rec.message = "unusable", "unreadable", f"cannot read file ({e.strerror or e})"
        return rec, None
    rec.info, rec.details = info, _warning_details(info, rel)
    rec.status = "warning" if info.warnings else "ok"
    if want_phash:
        import imagehash

        rec.phash = str(imagehash.phash(img))
    return rec, img


def _check_worker(params: dict[str, Any], item: tuple[int, str, str]) -> tuple[int, FileRecord]:
    i, path, rel = item
    rec, img = inspect_file(Path(path), rel, **params)
    if img is not None:
        img.close()
    return i, rec


def inspect_entries(entries: list[ImageEntry], *, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                    min_side: int = 8, near_duplicates: bool = False, progress: bool = True) -> list[FileRecord]:
    """Fully decode every entry (in parallel) and return their records in entry order."""
    params = {"max_pixels": max_pixels, "min_side": min_side, "want_phash": near_duplicates}
    items = [(i, str(e.path), e.rel) for i, e in enumerate(entries)]
    records: list[FileRecord | None] = [None] * len(entries)
    fn = functools.partial(_check_worker, params)
    for i, rec in pmap(fn, items, workers=workers, progress=progress, description="checking images"):
        rec.class_name, rec.subset = entries[i].class_name, entries[i].subset
        records[i] = rec
    return [r for r in records if r is not None]


# ----------------------------------------------------------------------------- report
@dataclass
class CheckReport:
    """Everything ``convlens check`` found; :meth:`to_dict` is the ``--json`` format."""

    root: Path
    layout: str
    classes: list[str]
    records: list[FileRecord]
    ignored: list[str] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    near_duplicates: list[list[str]] | None = None

    @property
    def unusable(self) -> list[FileRecord]:
        return [r for r in self.records if r.status == "unusable"]

    @property
    def warned(self) -> list[FileRecord]:
        return [r for r in self.records if r.status == "warning"]

    def class_counts(self) -> dict[str, int]:
        """Usable images per class."""
        c = Counter(r.class_name for r in self.records if r.usable)
        return {k: c.get(k, 0) for k in self.classes}

    def duplicates(self) -> list[dict[str, Any]]:
        """Groups of usable files with identical content, with label conflicts and leakage."""
        groups: dict[str, list[FileRecord]] = defaultdict(list)
        for r in self.records:
            if r.usable and r.sha256:
                groups[r.sha256].append(r)
        out = []
        for sha, rs in groups.items():
            if len(rs) < 2:
                continue
            classes = sorted({r.class_name for r in rs})
            subsets = sorted({r.subset for r in rs if r.subset})
            out.append({"sha256": sha, "paths": [r.rel for r in rs], "classes": classes,
                        "label_conflict": len(classes) > 1, "split_leak": len(subsets) > 1})
        return sorted(out, key=lambda g: g["paths"][0])

    def class_problems(self) -> dict[str, Any]:
        counts = self.class_counts()
        nonzero = [v for v in counts.values() if v > 0]
        ratio = (max(nonzero) / min(nonzero)) if len(nonzero) >= 2 else 1.0
        return {
            "empty": [k for k, v in counts.items() if v == 0],
            "single": [k for k, v in counts.items() if v == 1],
            "too_few_classes": len(nonzero) < 2,
            "imbalance_ratio": round(ratio, 3),
            "imbalanced": ratio > IMBALANCE_LIMIT,
        }

    @property
    def has_problems(self) -> bool:
        cp = self.class_problems()
        return bool(self.unusable or self.duplicates() or self.near_duplicates or cp["empty"]
                    or cp["single"] or cp["too_few_classes"] or cp["imbalanced"])

    @property
    def exit_code(self) -> int:
        return 1 if self.has_problems else 0

    def __repr__(self) -> str:
        s = self.to_dict()["summary"]
        return (f"CheckReport({str(self.root)!r}, {self.layout}: {s['files']} files, {s['usable']} usable, "
                f"{s['unusable']} unusable, {'problems found' if self.has_problems else 'fine'})")

    def _repr_html_(self) -> str:  # Jupyter shows this instead of the repr
        return report_html(self)

    def findings(self) -> list[Finding]:
        """Every problem and warning, as the findings table shows them."""
        return findings(self)

    def quarantine(self, qdir: str | os.PathLike[str]) -> Path:
        """Move the unusable files into ``qdir`` (outside the dataset); return the undo manifest
        (it records where each file went, renamed when its name was taken there)."""
        return quarantine(self, qdir).manifest

    def to_dict(self) -> dict[str, Any]:
        by_kind: dict[str, list[dict[str, str]]] = defaultdict(list)
        for r in self.unusable:
            by_kind[r.kind].append({"path": r.rel, "message": r.message})
        warn_kind: dict[str, list[dict[str, str]]] = defaultdict(list)
        for r in self.warned:
            for w, d in zip(r.info.warnings, r.details, strict=False):
                warn_kind[w].append({"path": r.rel, "detail": d})
        return {
            "root": str(self.root),
            "layout": self.layout,
            "params": self.params,
            "summary": {"files": len(self.records), "usable": sum(r.usable for r in self.records),
                        "with_warnings": len(self.warned), "unusable": len(self.unusable),
                        "ignored": len(self.ignored)},
            "classes": self.class_counts(),
            "unusable": dict(sorted(by_kind.items())),
            "warnings": dict(sorted(warn_kind.items())),
            "duplicates": self.duplicates(),
            "near_duplicates": self.near_duplicates,
            "class_problems": self.class_problems(),
            "ignored": self.ignored,
            "outside_class_folders": self.loose,
            "exit_code": self.exit_code,
        }


def _near_duplicate_groups(records: list[FileRecord], max_bits: int = NEAR_DUPLICATE_BITS) -> list[list[str]]:
    """Groups of usable files whose perceptual hashes differ in at most ``max_bits`` bits,
    excluding groups that are only exact copies (reported as duplicates already)."""
    rs = [r for r in records if r.usable and r.phash]
    if len(rs) < 2:
        return []
    h = np.array([int(r.phash, 16) for r in rs], dtype=np.uint64)
    # vectorised over j: 25k images take seconds, not hours
    near = [i + 1 + np.nonzero(np.bitwise_count(h[i] ^ h[i + 1:]) <= max_bits)[0]
            for i in range(len(rs) - 1)]
    rows = np.repeat(np.arange(len(near)), [len(j) for j in near])
    groups = [[rs[i] for i in g] for g in linked_groups(len(rs), rows, np.concatenate(near))]
    return sorted(([r.rel for r in g] for g in groups if len({r.sha256 for r in g}) > 1), key=lambda g: g[0])


def check_dataset(root: str | os.PathLike[str], *, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = 8, near_duplicates: bool = False, progress: bool = True,
                  index: DatasetIndex | None = None) -> CheckReport:
    """Scan and fully decode a dataset folder; return the report (prints nothing)."""
    resolve_workers(workers)  # its ConfigError before the scan
    if max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive number of pixels. Received: max_pixels={max_pixels}")
    if min_side < 1:
        raise ConfigError(f"min_side must be at least 1 pixel. Received: min_side={min_side}")
    index = index or scan(root)
    records = inspect_entries(index.entries, workers=workers, max_pixels=max_pixels, min_side=min_side,
                              near_duplicates=near_duplicates, progress=progress)
    report = CheckReport(root=index.root, layout=index.layout, classes=index.classes, records=records,
                         ignored=index.ignored, loose=index.loose,
                         params={"max_pixels": max_pixels, "min_side": min_side})
    if near_duplicates:
        report.near_duplicates = _near_duplicate_groups(records)
    return report


# ----------------------------------------------------------------------------- printing
def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOW])
    return shown + (f", ... (+{len(paths) - SHOW} more)" if len(paths) > SHOW else "")


@dataclass
class Finding:
    """One row of the findings table: ``severity`` is unusable, warning, dataset or note; ``kind``
    is machine-readable (an ``ImageError`` kind, a warning, or e.g. ``duplicate``, ``imbalance``);
    ``items`` are the files (or classes, or ``a = b`` groups) it concerns."""

    severity: str
    kind: str
    text: str
    items: list[str] = field(default_factory=list)
    note: str = ""
    files: int | None = None  # files concerned, when not one per item (duplicate groups)

    @property
    def count(self) -> str:
        """The table's ``files`` cell."""
        return str(self.files if self.files is not None else len(self.items)) if self.items else ""


def findings(report: CheckReport) -> list[Finding]:
    """Every problem and warning of ``report`` in the order the table shows them."""
    d = report.to_dict()
    out = [Finding("unusable", k, UNUSABLE_TEXT.get(k, k), [i["path"] for i in v]) for k, v in d["unusable"].items()]
    out += [Finding("warning", k, WARNING_TEXT.get(k, k), [i["path"] for i in v]) for k, v in d["warnings"].items()]
    dups = d["duplicates"]
    groups = [
        ("duplicate", "exact duplicates within a class", [g for g in dups if not g["label_conflict"]]),
        ("label_conflict", "same image in different classes (label conflict)", [g for g in dups if g["label_conflict"]]),
        ("split_leak", "same image in train and validation/test (leak)", [g for g in dups if g["split_leak"]]),
    ]
    for kind, text, gs in groups:
        if gs:
            out.append(Finding("dataset", kind, text, [" = ".join(g["paths"]) for g in gs],
                               files=sum(len(g["paths"]) for g in gs)))
    if d["near_duplicates"]:
        out.append(Finding("dataset", "near_duplicate", "near duplicates (perceptual hash)",
                           [" ~ ".join(g) for g in d["near_duplicates"]],
                           files=sum(len(g) for g in d["near_duplicates"])))
    cp = d["class_problems"]
    if cp["empty"]:
        out.append(Finding("dataset", "empty_class", "empty classes", list(cp["empty"])))
    if cp["single"]:
        out.append(Finding("dataset", "single_image_class", "classes with one image", list(cp["single"])))
    if cp["too_few_classes"]:
        out.append(Finding("dataset", "too_few_classes", "fewer than 2 classes with images",
                           note="a classifier needs at least 2"))
    if cp["imbalanced"]:
        out.append(Finding("dataset", "imbalance",
                           f"class imbalance {cp['imbalance_ratio']:.1f}:1 (over {IMBALANCE_LIMIT:g}:1)",
                           note="consider `--class-weights auto`"))
    if d["outside_class_folders"]:
        out.append(Finding("note", "outside_class_folders", "files outside class folders (not used)",
                           list(d["outside_class_folders"])))
    return out


FINDINGS_HEADER = ("severity", "kind", "path", "detail")
_SEVERITY_STYLE = {"unusable": "red", "warning": "yellow", "dataset": "red", "note": "dim"}


def finding_rows(report: CheckReport) -> list[tuple[str, str, str, str]]:
    """One line per finding and file (``FINDINGS_HEADER``): what ``convlens check | ...`` prints."""
    return [(f.severity, f.kind, item, f.note or f.text)
            for f in findings(report) for item in f.items or [""]]


def print_report(report: CheckReport, console: Any = None, plain: bool | None = None) -> None:
    """Render the report: rich tables for a person, tab-separated findings for a pipe.

    Piped (``plain``), stdout holds only the ``severity kind path detail`` lines, one per file;
    the summary goes to stderr.
    """
    from rich.console import Console
    from rich.table import Column, Table

    from convlens.display import is_interactive, print_table

    console = console or Console()
    plain = not is_interactive(console) if plain is None else plain
    info = Console(stderr=True) if plain else console
    d = report.to_dict()
    s = d["summary"]
    info.print(f"[bold]{report.root}[/bold] ({report.layout} layout): {s['files']} files, "
               f"{s['usable']} usable, {s['with_warnings']} with warnings, {s['unusable']} unusable"
               + (f", {s['ignored']} non-image files ignored" if s["ignored"] else ""))
    cp = d["class_problems"]
    if plain:
        info.print("classes: " + ", ".join(f"{k} {v}" for k, v in d["classes"].items()), highlight=False)
        print_table(FINDINGS_HEADER, finding_rows(report), console=console, plain=True)
    else:
        t = Table("class", Column("images", justify="right"), title="Classes (usable images)", title_justify="left")
        for k, v in d["classes"].items():
            t.add_row(k, str(v))
        console.print(t)
        t = Table("severity", "kind", Column("files", justify="right"), Column("names", overflow="fold"),
                  title="Findings", title_justify="left", show_lines=False)
        for f in findings(report):
            style = _SEVERITY_STYLE[f.severity]
            t.add_row(f"[{style}]{f.severity}[/{style}]", f.text, f.count, _names(f.items) if f.items else f.note)
        if t.row_count:
            console.print(t)
    if report.has_problems:
        info.print("[red]problems found[/red]" + (f"; move the {s['unusable']} unusable files out with "
                   "`--quarantine QDIR` (undo with `--undo`)" if s["unusable"] else ""))
    else:
        info.print(f"[green]dataset is fine[/green] (class balance {cp['imbalance_ratio']:.2f}:1)")


def report_html(report: CheckReport) -> str:
    """The report for a notebook (``CheckReport._repr_html_``): summary, classes and findings."""
    import html

    from convlens.display import html_table

    s = report.to_dict()["summary"]
    verdict = "problems found" if report.has_problems else "dataset is fine"
    rows = [(f.severity, f.text, f.count, _names(f.items) if f.items else f.note) for f in findings(report)]
    return (f"<div><b>{html.escape(str(report.root))}</b> ({html.escape(report.layout)} layout): {s['files']} files, "
            f"{s['usable']} usable, {s['with_warnings']} with warnings, {s['unusable']} unusable: "
            f"<b>{verdict}</b>"
            + html_table(("class", "images"), list(report.class_counts().items()))
            + (html_table(("severity", "kind", "files", "names"), rows) if rows else "") + "</div>")


# ----------------------------------------------------------------------------- quarantine
def quarantine(report: CheckReport, qdir: str | os.PathLike[str]) -> MoveReport:
    """Move the report's unusable files into ``qdir`` (keeping relative paths; a taken name gets a
    free one) through :func:`convlens.data.moves.quarantine_files`; return what moved."""
    return quarantine_files(report.root, [{"path": r.rel, "kind": r.kind, "message": r.message}
                                          for r in report.unusable], qdir)


# ----------------------------------------------------------------------------- CLI + callers
def run_check(dir: str | None, json_path: str | None = None, quarantine_dir: str | None = None,
              undo: str | None = None, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
              min_side: int = 8, near_duplicates: bool = False, progress: bool = True) -> int:
    """The ``convlens check`` verb. Returns 0 (fine), 1 (problems found); raises UserError (2)."""
    from rich.console import Console

    from convlens.display import is_interactive

    console = Console()
    info = console if is_interactive(console) else Console(stderr=True)  # stdout: findings only
    if undo:
        if quarantine_dir:
            raise ConfigError(f"use either --quarantine or --undo, not both. Received: --undo {undo!r}")
        return undo_quarantine(undo).print_to(info)
    if not dir:
        raise ConfigError("check needs a dataset folder: `convlens check DIR`. Received: DIR=None")
    report = check_dataset(dir, workers=workers, max_pixels=max_pixels, min_side=min_side,
                           near_duplicates=near_duplicates, progress=progress)
    print_report(report, console)
    moves = None
    try:
        if quarantine_dir and report.unusable:
            moves = quarantine(report, quarantine_dir)
            print_moves(moves, info, f"unusable file(s) to {moves.destination}", "check")
        elif quarantine_dir:
            info.print("no unusable files: nothing moved")
    finally:  # the report is written even when a move fails
        if json_path:
            cio.write_json(json_path, {**report.to_dict(), **({"moves": moves.to_dict()} if moves else {})})
            info.print(f"report written to {json_path}", markup=False, soft_wrap=True)
    return report.exit_code


class SkippedFiles(list):  # type: ignore[type-arg]
    """The unusable files a run skipped (``ImageError`` each), remembering the dataset folder."""

    def __init__(self, errors: list[ImageError] | None = None, root: Path | None = None) -> None:
        super().__init__(errors or [])
        self.root = root


def skipped_message(skipped: list[ImageError]) -> str:
    """One line for train/evaluate/predict: ``"skipped 3 unusable files; run `convlens check DIR` for details"``."""
    n = len(skipped)
    if not n:
        return ""
    root = getattr(skipped, "root", None)
    where = shlex.quote(str(root)) if root else "DIR"
    return f"skipped {n} unusable file{'s' if n != 1 else ''}; run `convlens check {where}` for details"
