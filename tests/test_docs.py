"""The docs check: every ```bash and ```python block of docs/tutorial.md runs, in order, and works.

The tutorial is written for the full dataset and full-size training; this test replays it on a
small temporary copy, with heavy options scaled down. The substitution table:

=====================================================  =============================================
in the tutorial                                        in this test
=====================================================  =============================================
``../shared/datasets/cats_and_dogs_filtered``          ``TMP/cats_and_dogs_filtered``: 4 real photos per
                                                       class and subset plus every photo the tutorial
                                                       names (generated JPEGs when ../shared is absent)
``docs/figures/NAME``                                  ``TMP/figures/NAME``
the working directory (``runs/``, ``explain/``, ...)   ``TMP``
``convlens train ...``                                 + ``--epochs 1 --image-size 32 --batch-size 8
                                                       --workers 1 --threads 1 --cache-dir TMP/cache``
``convlens demo-layer ...``                            + ``--size 24``
``convlens preview ...``                               + ``--image-size 32``
``convlens check ...``                                 + ``--workers 1``
``convlens inspect MODEL ...`` (MODEL not a bundle)    + ``--image-size 32``
=====================================================  =============================================

Flags are appended, so they win over the tutorial's (argparse keeps the last occurrence).
Every command must exit with 0, or with N when its line ends in ``# exit N``. A ```text block
right after a ```bash block marked ``<!-- expected output -->`` must equal that command's output.
Python blocks get the same path substitutions and run with ``exec`` in the temporary folder.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.cli import main
from tests.conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"
DATASET = "../shared/datasets/cats_and_dogs_filtered"
SUBSETS = ("train/cats", "train/dogs", "validation/cats", "validation/dogs")
PER_FOLDER = 4
APPENDED = {
    "train": ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--workers", "1", "--threads", "1",
              "--cache-dir", "{tmp}/cache"],
    "demo-layer": ["--size", "24"],
    "preview": ["--image-size", "32"],
    "check": ["--workers", "1"],
}


def _figures_module():
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "docs" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_figures"] = module
    spec.loader.exec_module(module)
    return module


mf = _figures_module()


def mini_dataset(root: Path, text: str) -> Path:
    """A small copy of cats_and_dogs_filtered with every photo the tutorial names."""
    real = SHARED / "cats_and_dogs_filtered"
    named = set(re.findall(re.escape(DATASET) + r"/(\S+?\.jpg)", text))
    rng = np.random.default_rng(0)
    for sub in SUBSETS:
        (root / sub).mkdir(parents=True, exist_ok=True)
        if real.is_dir():
            files = sorted((real / sub).iterdir())[:PER_FOLDER]
            files += [real / n for n in named if n.startswith(sub + "/")]
            for f in files:
                shutil.copyfile(f, root / sub / f.name)
        else:
            stem = "cat" if "cats" in sub else "dog"
            first = 0 if sub.startswith("train") else 2000
            names = {f"{stem}.{first + i}.jpg" for i in range(PER_FOLDER)}
            names |= {n.split("/")[-1] for n in named if n.startswith(sub + "/")}
            for name in names:
                a = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
                a[:, :, 0 if stem == "cat" else 2] += 120
                Image.fromarray(a).save(root / sub / name, "JPEG")
    return root


def localise(argv: list[str], tmp: Path, data: Path) -> list[str]:
    """Apply the substitution table to one command."""
    out = []
    for a in argv:
        a = a.replace(DATASET, str(data))
        if a.startswith("docs/figures/"):
            a = str(tmp / "figures" / a[len("docs/figures/"):])
        out.append(a)
    verb = out[1]
    extra = [x.format(tmp=tmp) for x in APPENDED.get(verb, [])]
    if verb == "inspect" and not out[2].endswith(".convlens"):
        extra = ["--image-size", "32"]
    return out + extra


def test_tutorial_runs(tmp_path, monkeypatch, capsys) -> None:
    text = TUTORIAL.read_text(encoding="utf-8")
    data = mini_dataset(tmp_path / "cats_and_dogs_filtered", text)
    (tmp_path / "figures").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    blocks = mf.parse_blocks(text)
    ran = 0
    for i, block in enumerate(blocks):
        where = f"docs/tutorial.md:{block.line}"
        if block.lang == "bash":
            for cmd in mf.commands(block):
                assert cmd.argv[0] == "convlens", f"{where}: only convlens commands are run: {cmd.argv}"
                argv = localise(cmd.argv, tmp_path, data)
                capsys.readouterr()
                code = main(argv[1:])
                out, err = capsys.readouterr()
                assert code == cmd.exit_code, (f"{where}: `{shlex.join(cmd.argv)}` exited with {code}, "
                                               f"expected {cmd.exit_code}\n{err[-2000:]}")
                ran += 1
                if block.expect_output:
                    expected = blocks[i + 1]
                    assert expected.lang == "text", f"{where}: expected output needs a ```text block after it"
                    got = [ln.rstrip() for ln in out.strip().splitlines()]
                    want = [ln.rstrip() for ln in expected.text.strip().splitlines()]
                    assert got == want, f"{where}: the output of `{shlex.join(cmd.argv)}` changed"
        elif block.lang == "python":
            code = block.text.replace(DATASET, str(data))
            try:
                exec(compile(code, where, "exec"), {"__name__": "__tutorial__"})  # our own document
            except Exception as e:  # name the block, keep the original traceback
                raise AssertionError(f"{where}: the python block failed: {e!r}") from e
            ran += 1
    assert ran >= 20
    # the figure commands really wrote their figures
    for name in mf.figure_names(text):
        if name not in mf.DERIVED:
            assert (tmp_path / "figures" / name).is_file(), name
    assert (tmp_path / "explain" / "grid.png").is_file()
    assert (tmp_path / "inspect" / "inspect.html").is_file()


def test_every_figure_has_a_command_and_is_small() -> None:
    text = TUTORIAL.read_text(encoding="utf-8")
    names = mf.figure_names(text)
    made = {mf.figure_of(c) for c in mf.tutorial_commands(text)}
    assert names and set(names) <= made, f"figures without a command in the tutorial: {set(names) - made}"
    for name in names:
        path = REPO / "docs" / "figures" / name
        assert path.is_file(), f"{path} is missing: run `make docs`"
        assert path.stat().st_size <= mf.MAX_BYTES, f"{path} is over 150 KB"


def test_parser_reads_exit_codes_and_comments() -> None:
    doc = "intro\n\n```bash\n# a comment\nconvlens check data  # exit 1\nconvlens summary tiny\n```\n"
    (block,) = mf.parse_blocks(doc)
    cmds = mf.commands(block)
    assert [c.argv for c in cmds] == [["convlens", "check", "data"], ["convlens", "summary", "tiny"]]
    assert [c.exit_code for c in cmds] == [1, 0] and cmds[0].line == 5


@pytest.mark.parametrize(("argv", "figure"), [
    (["convlens", "demo-layer", "relu", "x.jpg", "--out", "docs/figures/relu.png"], "relu.png"),
    (["convlens", "explain", "m.convlens", "x.jpg", "--out", "explain"], "cam.png"),
    (["convlens", "demo-layer", "relu", "x.jpg", "--out", "relu.png"], None),
])
def test_figure_of(argv, figure) -> None:
    assert mf.figure_of(mf.Command(argv, 0, 1)) == figure
