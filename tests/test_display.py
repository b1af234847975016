"""print_table: rich tables for people, tab-separated lines for pipes; HTML pieces."""

from __future__ import annotations

import io

from rich.console import Console

from convlens.display import html_table, img_tag, print_table, tsv_line


def test_tsv_line_keeps_one_line_per_row() -> None:
    assert tsv_line(["a b", None, 0.5, "tab\there", "two\nlines"]) == "a b\t\t0.5\ttab here\ttwo lines"


def test_print_table_plain_when_piped_and_boxed_on_a_terminal() -> None:
    rows = [["b.jpg", "dog", "0.9000"], ["a.jpg", "cat", "0.7000"]]
    piped = Console(file=io.StringIO(), width=100)  # a file: not a terminal
    print_table(["file", "label", "probability"], rows, console=piped, title="ignored when piped")
    assert piped.file.getvalue() == "file\tlabel\tprobability\nb.jpg\tdog\t0.9000\na.jpg\tcat\t0.7000\n"
    term = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    print_table(["file", "label", "probability"], rows, console=term, right=("probability",))
    out = term.file.getvalue()
    assert "\t" not in out and "│" in out and "b.jpg" in out
    forced = Console(file=io.StringIO(), width=100, force_terminal=True)
    print_table(["x"], [["1"]], console=forced, plain=True)
    assert forced.file.getvalue() == "x\n1\n"


def test_html_pieces_escape_and_embed() -> None:
    page = html_table(["name", "p"], [["<cat>", 0.123456], ["dog", None]])
    assert "&lt;cat&gt;" in page and "0.1235" in page and "–" in page
    assert img_tag(b"\x89PNG", 'a "b"', width=10).startswith('<img alt="a &quot;b&quot;" width="10" src="data:image/png;base64,')
