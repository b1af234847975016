"""``convlens runs`` and ``convlens compare``: list the run folders and put runs side by side.

A run folder is what :mod:`convlens.engine.trainer` writes: ``config.yaml`` (the resolved
configuration), ``metrics.csv`` (one row per epoch) and, once finished, the bundle. Nothing here
changes a run folder; ``compare`` writes its PNG and HTML atomically elsewhere.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import html
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from convlens import display
from convlens.engine.run_folder import BUNDLE_NAME, METRIC_FIELDS, best_row
from convlens.errors import DataError

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.csv"
COLUMNS = ("name", "date", "model", "data", "best_val_acc", "best_epoch", "epochs", "time", "status")
COMPARE_PNG = "compare.png"
COMPARE_HTML = "compare.html"


@dataclass
class RunInfo:
    """What one run folder says about itself."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    started: _dt.datetime | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return (self.path / BUNDLE_NAME).is_file()

    @property
    def best(self) -> dict[str, Any] | None:
        """The best epoch's row, by the trainer's rule (:func:`run_folder.best_row`)."""
        return best_row(self.history)

    @functools.cached_property
    def summary(self) -> dict[str, Any]:
        """The bundle's metrics (what runs without ``metrics.csv``, e.g. a fitted linear head, have)."""
        if not self.finished:
            return {}
        from convlens.errors import UserError
        from convlens.infer.bundle import read_meta

        try:
            return dict(read_meta(self.path / BUNDLE_NAME).metrics or {})
        except (UserError, OSError, ValueError):
            return {}  # a damaged bundle: list the run with what metrics.csv says

    @property
    def seconds(self) -> float:
        if self.history:
            return float(sum(r.get("seconds") or 0.0 for r in self.history))
        stages = self.summary.get("seconds")
        return float(sum(v for v in stages.values() if isinstance(v, (int, float)))) if isinstance(stages, dict) else 0.0

    def row(self) -> dict[str, Any]:
        """One line of ``convlens runs`` as plain data (the ``--json`` format)."""
        best = self.best
        if best is None and self.summary.get("val_accuracy") is not None:
            best = {"val_acc": self.summary["val_accuracy"], "epoch": self.summary.get("best_epoch") or 0}
        planned = self.config.get("epochs")
        return {
            "name": self.name, "path": str(self.path),
            "date": self.started.strftime("%Y-%m-%d %H:%M") if self.started else None,
            "model": self.config.get("model"), "data": self.config.get("data"),
            "best_val_acc": best["val_acc"] if best else None,
            "best_epoch": int(best["epoch"]) if best else None,
            "epochs": f"{len(self.history)}/{planned}" if planned else str(len(self.history)),
            "time": round(self.seconds, 1),
            "status": "finished" if self.finished else ("not started" if not self.history else "unfinished"),
        }


def _number(text: str) -> float | None:
    if text in ("", None):
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def read_history(path: Path) -> list[dict[str, Any]]:
    """``metrics.csv`` rows with numbers parsed (empty cells -> ``None``); missing file -> ``[]``."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    parsed = [{k: _number(r.get(k, "")) for k in METRIC_FIELDS} for r in rows]
    return [{**row, "epoch": int(row["epoch"])} for row in parsed if row["epoch"] is not None]


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def read_run(path: str | os.PathLike[str]) -> RunInfo:
    """Read one run folder. Raises :class:`DataError` when it is not one."""
    p = Path(path).expanduser()
    if not is_run_dir(p):
        raise DataError(f"not a convlens run folder (no {CONFIG_NAME}); pass a folder under runs/ "
                        f"(see `convlens runs`). Received: {str(path)!r}")
    try:
        config = yaml.safe_load((p / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError) as e:
        raise DataError(f"cannot read {p / CONFIG_NAME} ({e}). Received: {str(path)!r}") from e
    if not isinstance(config, dict):
        raise DataError(f"{p / CONFIG_NAME} is not a mapping of configuration keys. Received: {str(path)!r}")
    started = _dt.datetime.fromtimestamp((p / CONFIG_NAME).stat().st_mtime)
    return RunInfo(path=p, config=config, history=read_history(p / METRICS_NAME), started=started)


def find_runs(root: str | os.PathLike[str] = "runs") -> list[RunInfo]:
    """Every run folder directly under ``root`` (or ``root`` itself), oldest first."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"no runs folder here; train first (`convlens train DIR`) or pass the folder "
                        f"that holds your runs. Received: {str(root)!r}")
    if is_run_dir(r):
        return [read_run(r)]
    runs = [read_run(d) for d in sorted(r.iterdir()) if d.is_dir() and is_run_dir(d)]
    return sorted(runs, key=lambda x: (x.started or _dt.datetime.min, x.name))


# ----------------------------------------------------------------------------- printing
def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "best_val_acc":
        return f"{value:.4f}"
    if key == "time":
        return display.clock(value)
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...], title: str = "") -> None:
    """Run rows as a rich table on a terminal, tab-separated lines when piped (``display.print_table``)."""
    display.print_table(columns, [[_cell(c, r.get(c)) for c in columns] for r in rows], title=title or None,
                        right=("best_val_acc", "best_epoch", "time"), fold=columns)


def runs_command(root: str = "runs", json_path: str | None = None) -> int:
    """``convlens runs [DIR]``: one line per run folder."""
    from convlens.files import write_json

    rows = [r.row() for r in find_runs(root)]
    if json_path:
        write_json(json_path, rows)
    if not rows:
        print(f"no run folders in {root}", file=sys.stderr)
        return 0
    print_table(rows, COLUMNS, title=f"runs in {root}")
    return 0


# ----------------------------------------------------------------------------- compare
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(runs: list[RunInfo]) -> dict[str, list[Any]]:
    """Configuration keys whose values differ between the runs: key -> one value per run
    (``None`` where a run lacks the key, e.g. one made by an older version)."""
    flats = [_flat(r.config) for r in runs]
    values = {k: [f.get(k) for f in flats] for k in dict.fromkeys(k for f in flats for k in f)}
    return {k: vs for k, vs in values.items()
            if len({json.dumps(v, sort_keys=True, default=str) for v in vs}) > 1}


def compare_png(runs: list[RunInfo]) -> bytes:
    """Loss and accuracy per epoch of every run: validation solid, training dashed, one colour per run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from convlens.evaluate.plots import png_bytes

    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        epochs = [r["epoch"] for r in run.history]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            for prefix, style, side in (("val_", "-", "validation"), ("train_", "--", "training")):
                pts = [(e, r[prefix + key]) for e, r in zip(epochs, run.history, strict=True)
                       if r.get(prefix + key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=color, linewidth=1.4,
                            label=f"{run.name} ({side})")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if ax_acc.has_data():
        ax_acc.legend(fontsize=8, loc="lower right")
    return png_bytes(fig)


def compare_html(runs: list[RunInfo], png: bytes, diffs: dict[str, list[Any]]) -> str:
    """A self-contained page: the curves, a summary row per run and the configuration differences."""
    from convlens.evaluate.report import html_page

    summary = [[r.name, _cell("date", w["date"]), r.config.get("model"), r.config.get("data"),
                _cell("best_val_acc", w["best_val_acc"]), _cell("best_epoch", w["best_epoch"]),
                w["epochs"], _cell("time", r.seconds), w["status"]] for r, w in ((r, r.row()) for r in runs)]
    header = ["run", "date", "model", "data", "best val acc", "best epoch", "epochs", "time", "status"]
    parts = ["<h2>Runs</h2>", display.html_table(header, summary, align=None),
             "<h2>Curves</h2>", display.img_tag(png, "loss and accuracy per epoch of every run"),
             "<h2>Configuration differences</h2>"]
    if diffs:
        parts.append(display.html_table(["key", *(r.name for r in runs)],
                                        [[k, *(json.dumps(v, default=str) for v in vs)] for k, vs in diffs.items()],
                                        align=None))
    else:
        parts.append("<p>The runs have the same configuration.</p>")
    paths = "".join(f"<li>{html.escape(str(r.path))}</li>" for r in runs)
    parts.append(f"<h2>Run folders</h2><ul>{paths}</ul>")
    return html_page("convlens compare", parts, subtitle=", ".join(r.name for r in runs))


def compare_command(paths: list[str], out: str = "compare") -> int:
    """``convlens compare RUN RUN...``: writes ``OUT/compare.png`` and ``OUT/compare.html``."""
    from convlens.files import write_bytes, write_text

    if len(paths) < 2:
        raise DataError(f"compare needs at least two run folders. Received: {' '.join(paths) or 'none'}")
    runs = [read_run(p) for p in paths]
    diffs = config_differences(runs)
    png = compare_png(runs)
    out_dir = Path(out)
    write_bytes(out_dir / COMPARE_PNG, png)
    write_text(out_dir / COMPARE_HTML, compare_html(runs, png, diffs))
    print_table([r.row() for r in runs], COLUMNS)
    rows = [{"key": k, **{r.name: json.dumps(v, default=str) for r, v in zip(runs, vs, strict=True)}}
            for k, vs in diffs.items()]
    if rows:
        print_table(rows, ("key", *(r.name for r in runs)), title="configuration differences")
    else:
        print("the runs have the same configuration")
    print(f"written: {out_dir / COMPARE_HTML} and {out_dir / COMPARE_PNG}", file=sys.stderr)
    return 0
