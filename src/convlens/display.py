"""Tables for people and for pipes, and small HTML pieces for notebooks (torch-free).

:func:`print_table` is the one way a verb prints a result table: a rich table on a terminal or
in Jupyter, and plain tab-separated lines (header first) when stdout is a pipe or a file, so
``convlens predict ... | sort -t$'\\t' -k3`` and ``| awk -F'\\t'`` work. :func:`html_table` and
:func:`img_tag` build the ``_repr_html_`` of the Python API's result objects.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

# Cell characters that would break a TSV line: a tab or line break inside a value becomes a space.
_TSV_BREAKERS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def is_interactive(console: Any) -> bool:
    """True when ``console`` shows rich output to a person (a terminal or a Jupyter notebook)."""
    return bool(console.is_terminal or console.is_jupyter)


def tsv_line(values: Sequence[Any]) -> str:
    """One tab-separated line; ``None`` is empty and tabs or newlines in a value become spaces."""
    return "\t".join("" if v is None else str(v).translate(_TSV_BREAKERS) for v in values)


def print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    console: Any = None,
    title: str | None = None,
    caption: str | None = None,
    right: Sequence[str] = (),
    fold: Sequence[str] = (),
    plain: bool | None = None,
) -> None:
    """Print a table on ``console`` (stdout by default).

    Interactive (terminal or Jupyter): a rich table with ``title`` and ``caption``; the columns
    named in ``right`` are right-aligned and those in ``fold`` wrap long values. Otherwise (a
    pipe, a file): the header and each row as tab-separated lines, nothing else, so the output
    can be sorted and cut. ``plain`` forces one or the other.
    """
    from rich.console import Console

    console = console or Console()
    if plain is None:
        plain = not is_interactive(console)
    if plain:
        # console.file, not print(): the console may write to stderr or a test's buffer.
        console.file.write("".join(tsv_line(r) + "\n" for r in [header, *rows]))
        console.file.flush()
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, show_edge=False, header_style="bold")
    for name in header:
        table.add_column(name, justify="right" if name in right else "left",
                         overflow="fold" if name in fold else "ellipsis")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    console.print(table)


def html_cell(v: Any, digits: int = 4) -> str:
    """One value for an HTML page: ``–`` for None, floats with ``digits`` decimals, text escaped."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 4,
               align: str | None = "left") -> str:
    """An HTML table; floats are shown with ``digits`` decimals, everything is escaped.

    ``align``: every cell's alignment, inline (notebooks right-align by default); None leaves it to
    the page's style sheet (the report right-aligns numbers).
    """
    style = f" style='text-align:{align}'" if align else ""
    head = "".join(f"<th{style}>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{style}>{html_cell(v, digits)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    """An ``<img>`` with the PNG embedded as a data URI (self-contained: no files, no network)."""
    data = base64.b64encode(png).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{data}">'


def shows_progress(console: Any = None) -> bool:
    """Whether live progress bars can be drawn on ``console`` (default: stderr): a terminal, or
    Jupyter with ipywidgets (rich draws its live display into a widget, and warns without one)."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    if console.is_terminal:
        return True
    if not console.is_jupyter:
        return False
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05`` (the training ETA and the runs table)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
