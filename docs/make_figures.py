"""Regenerate every figure of docs/tutorial.md by running the commands printed beside them.

    python docs/make_figures.py                      # or: make docs
    python docs/make_figures.py --bundle runs/tutorial/model.convlens   # CAMs from a real run

The tutorial is the single source: every ```bash block whose command writes ``--out
docs/figures/NAME`` is run as written (from the repository root's point of view), and the
figures made by other commands are taken from their outputs (see ``DERIVED``). The class
activation maps need a trained bundle: pass one with ``--bundle``, otherwise a short run of the
tutorial preset (``--epochs 6 --image-size 128``, a couple of minutes on a laptop) is trained in
a temporary folder first. PNGs over 150 KB are re-encoded with a 256-colour palette so the
repository stays small.

This module also holds the parser that ``tests/test_docs.py`` uses to run the whole tutorial.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
TUTORIAL = DOCS / "tutorial.md"
FIGURES = DOCS / "figures"
DATASET = "../shared/datasets/cats_and_dogs_filtered"  # as the tutorial writes it
TUTORIAL_BUNDLE = "runs/tutorial/model.convlens"  # the bundle the tutorial's training run writes
MAX_BYTES = 150 * 1024
# Figures that a command writes somewhere else: figure name -> (verb, file the command writes).
DERIVED = {"cam.png": ("explain", "explain/grid.png")}
# The short run behind the CAM figure when no --bundle is given.
QUICK_TRAIN = ["--epochs", "6", "--image-size", "128", "--batch-size", "32"]

_FENCE = re.compile(r"^```(\w*)\s*$")
_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


@dataclass
class Block:
    """One fenced block of the tutorial."""

    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    expect_output: bool = False  # preceded by <!-- expected output -->: the next text block is its output


@dataclass
class Command:
    """One command line of a ```bash block."""

    argv: list[str]
    exit_code: int
    line: int

    @property
    def verb(self) -> str:
        return self.argv[1] if len(self.argv) > 1 else ""

    def option(self, name: str) -> str | None:
        """The value of the last ``name`` option, if any."""
        value = None
        for a, b in zip(self.argv, self.argv[1:], strict=False):
            if a == name:
                value = b
        return value


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m and m.group(1):
            start = i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            blocks.append(Block(m.group(1), "\n".join(body) + "\n", start + 1,
                                prev.strip() == "<!-- expected output -->"))
        i += 1
    return blocks


def commands(block: Block) -> list[Command]:
    """The command lines of a ```bash block (``# exit N`` at the end gives the expected code)."""
    out = []
    for k, raw in enumerate(block.text.splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXIT.search(line)
        code = int(m.group(1)) if m else 0
        argv = shlex.split(line, comments=True)
        out.append(Command(argv, code, block.line + 1 + k))
    return out


def tutorial_commands(text: str | None = None) -> list[Command]:
    """Every command of every ```bash block of the tutorial, in order."""
    blocks = parse_blocks(TUTORIAL.read_text(encoding="utf-8") if text is None else text)
    return [c for b in blocks if b.lang == "bash" for c in commands(b)]


def figure_names(text: str) -> list[str]:
    """The figures the tutorial shows: ``![...](figures/NAME)``."""
    return re.findall(r"!\[[^\]]*\]\(figures/([^)\s]+)\)", text)


def figure_of(cmd: Command) -> str | None:
    """The figure a command makes (its ``--out docs/figures/NAME``, or a DERIVED one)."""
    out = cmd.option("--out") or ""
    if out.startswith("docs/figures/"):
        return out[len("docs/figures/"):]
    for name, (verb, _) in DERIVED.items():
        if cmd.verb == verb:
            return name
    return None


# ----------------------------------------------------------------------------- regeneration
def shrink_png(path: Path, limit: int = MAX_BYTES) -> int:
    """Re-encode a PNG over ``limit`` bytes with a 256-colour palette (then downscale if needed)."""
    from PIL import Image

    if path.suffix.lower() != ".png" or path.stat().st_size <= limit:
        return path.stat().st_size
    from convlens.files import write_bytes

    img = Image.open(path).convert("RGB")
    scale = 1.0
    while True:
        im = img if scale == 1.0 else img.resize((round(img.width * scale), round(img.height * scale)),
                                                 Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        if buf.tell() <= limit or scale < 0.3:
            write_bytes(path, buf.getvalue())
            return buf.tell()
        scale *= 0.85


def _run(argv: list[str]) -> None:
    from convlens.cli import main

    print("$", shlex.join(argv), flush=True)
    code = main(argv[1:])
    if code != 0:
        raise SystemExit(f"make_figures: `{shlex.join(argv)}` exited with {code}")


def regenerate(bundle: str | None = None, only: list[str] | None = None) -> list[Path]:
    """Run the tutorial's figure commands; returns the figures written."""
    data = (REPO / DATASET).resolve()
    if not data.is_dir():
        raise SystemExit(f"make_figures: the dataset is not at {data}; see docs/tutorial.md")
    text = TUTORIAL.read_text(encoding="utf-8")
    wanted = set(figure_names(text))
    todo = [(c, figure_of(c)) for c in tutorial_commands(text)]
    todo = [(c, f) for c, f in todo if f in wanted and (not only or f in only)]
    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="convlens-figures-") as tmp:
        work = Path(tmp)

        def localise(argv: list[str], bundle_path: str | None) -> list[str]:
            out = []
            for a in argv:
                a = a.replace(DATASET, str(data))
                if a.startswith("docs/figures/"):
                    a = str(FIGURES / a[len("docs/figures/"):])
                if a == TUTORIAL_BUNDLE and bundle_path:
                    a = bundle_path
                out.append(a)
            return out

        bundle_path = str(Path(bundle).resolve()) if bundle else None
        if bundle_path is None and any(c.verb == "explain" for c, _ in todo):
            train = next(c for c in tutorial_commands(text) if c.verb == "train" and "tutorial" in c.argv)
            _run(localise(train.argv, None) + QUICK_TRAIN + ["--project", str(work / "runs"), "--name", "tutorial"])
            bundle_path = str(work / "runs" / "tutorial" / "model.convlens")
        for cmd, name in todo:
            argv = localise(cmd.argv, bundle_path)
            if name in DERIVED:
                verb, produced = DERIVED[name]
                out_dir = Path(produced).parts[0]
                argv = [str(work / out_dir) if prev == "--out" else a for prev, a in zip(["", *argv[:-1]], argv, strict=True)]
                _run(argv)
                shutil.copyfile(work / produced, FIGURES / name)
            else:
                _run(argv)
            size = shrink_png(FIGURES / name)
            print(f"  {name}: {size / 1024:.0f} KB", flush=True)
            written.append(FIGURES / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None, help="trained tutorial bundle for the CAM figure "
                                                  "(default: train a short run first)")
    p.add_argument("figures", nargs="*", help="only these figures (file names, e.g. relu.png)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    written = regenerate(a.bundle, a.figures or None)
    print(f"wrote {len(written)} figure(s) to {FIGURES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
