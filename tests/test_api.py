"""The Python API (``convlens.check/train/evaluate/export/load``): the CLI's verbs as objects."""

from __future__ import annotations

import ast
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import convlens
from convlens.cli import main
from tests.engine.helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _tiny(tmp: Path) -> dict[str, Any]:
    """Keyword options for a run of a few seconds, everything under ``tmp``."""
    return {"preset": "quick", "image_size": 16, "batch_size": 8, "epochs": 2, "workers": 1, "threads": 1,
            "cache_dir": str(tmp / "cache"), "project": str(tmp / "runs"), "console": _quiet()}


@pytest.fixture(scope="module")
def two_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("api") / "data", classes=2, per_class=12)


@pytest.fixture(scope="module")
def finished(two_class: Path, tmp_path_factory: pytest.TempPathFactory) -> convlens.Run:
    return convlens.train(two_class, **_tiny(tmp_path_factory.mktemp("run")))


# ----------------------------------------------------------------------------- the package
def test_import_is_light_and_names_resolve() -> None:
    code = ("import sys, convlens; assert 'torch' not in sys.modules, 'import convlens imported torch'; "
            "import convlens.export.onnx, convlens.evaluate.metrics; "
            "assert callable(convlens.evaluate) and callable(convlens.export); "
            "assert callable(convlens.train) and callable(convlens.check) and callable(convlens.load); "
            "assert issubclass(convlens.errors.UserError, convlens.ConvlensError); print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_library_never_exits_the_process() -> None:
    """Only the command-line entry points may end the process (SystemExit / sys.exit / exit())."""
    allowed = {"cli.py", "__main__.py", "engine/distributed.py"}  # entry points (`python -m ...`)
    offenders = []
    for path in (REPO / "src" / "convlens").rglob("*.py"):
        rel = path.relative_to(REPO / "src" / "convlens").as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Raise)) else ""
            exits = any(s in text for s in ("sys.exit(", "SystemExit", "os._exit(")) or text.startswith("exit(")
            if exits and rel not in allowed:
                offenders.append(f"{rel}:{node.lineno}: {text[:60]}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("keywords", "flags", "message"), [
    ({"epoch": 3}, None, "unknown configuration key 'epoch'. Did you mean 'epochs'?"),
    ({"lr": -1}, ["--lr", "-1"], "lr must be > 0. Received: lr=-1.0"),
    ({"optimizer": "adamm"}, ["--optimizer", "adamm"], "Did you mean 'adam'?"),
    ({"preset": "tutorail"}, None, "unknown preset 'tutorail'"),
])
def test_errors_are_the_clis_one_liners(two_class: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        keywords: dict[str, Any], flags: list[str] | None, message: str) -> None:
    with pytest.raises(convlens.ConvlensError) as e:
        convlens.train(two_class, project=str(tmp_path / "runs"), **keywords)
    assert message in str(e.value) and "\n" not in str(e.value)
    if flags is None:  # not a flag: the same key in a config file gives the same line
        (tmp_path / "c.yaml").write_text("".join(f"{k}: {v}\n" for k, v in keywords.items()))
        flags = ["--config", str(tmp_path / "c.yaml")]
    assert main(["train", str(two_class), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"convlens train: error: {e.value}"
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- train
def test_train_returns_a_run(finished: convlens.Run, two_class: Path) -> None:
    run = finished
    assert run.status == "finished" and not run.interrupted
    assert run.config["data"] == str(two_class) and run.config["epochs"] == 2 and run.config["model"] == "tiny"
    assert [r["epoch"] for r in run.history] == [1, 2]
    assert {"train_loss", "val_acc", "val_loss", "lr"} <= set(run.history[0])
    assert run.metrics["best_epoch"] in (1, 2) and 0.0 <= run.metrics["val_accuracy"] <= 1.0
    assert run.best["epoch"] == run.metrics["best_epoch"]
    assert run.bundle_path == run.dir / "model.convlens" and run.bundle_path.is_file()
    clf = run.load()
    assert clf.classes == ["class_0", "class_1"]
    pred = clf.predict(str(next((two_class / "class_1").iterdir())))[0]
    assert pred.label in clf.classes
    again = convlens.Run.from_dir(run.dir)  # the folder alone tells the same story
    assert again.history == run.history and again.metrics == run.metrics and again.config == run.config


def test_run_shows_itself(finished: convlens.Run) -> None:
    page = finished._repr_html_()
    assert "val_accuracy" in page and "data:image/png;base64," in page and str(finished.dir) in page
    assert repr(finished).startswith(f"Run({str(finished.dir)!r}, finished, best_epoch=")


def test_history_frame(finished: convlens.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = finished.history_frame()
    assert list(frame.index) == [1, 2] and frame["val_acc"].tolist() == [r["val_acc"] for r in finished.history]
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(convlens.ConvlensError, match="needs pandas"):
        finished.history_frame()


def test_ctrl_c_checkpoints_and_returns_an_interrupted_run(two_class: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.engine import training

    real_train = training.train

    def train_and_press_ctrl_c(cfg: Any, **kwargs: Any) -> Any:
        def press(epoch: int, step: int) -> None:
            if (epoch, step) == (1, 0):  # in the second epoch, as a person would
                os.kill(os.getpid(), signal.SIGINT)

        return real_train(cfg, **{**kwargs, "on_step": press})

    monkeypatch.setattr(training, "train", train_and_press_ctrl_c)
    run = convlens.train(two_class, **_tiny(tmp_path))
    assert run.interrupted and run.status == "interrupted"
    assert run.checkpoint == run.dir / "checkpoints" / "last.pt" and run.checkpoint.is_file()
    assert run.bundle_path is None and [r["epoch"] for r in run.history] == [1]
    assert "run.resume()" in run._repr_html_()
    with pytest.raises(convlens.ConvlensError, match="interrupted"):
        run.load()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(training, "train", real_train)
    done = run.resume(console=_quiet())
    assert done.dir == run.dir and done.status == "finished" and [r["epoch"] for r in done.history] == [1, 2]
    assert done.load().classes == ["class_0", "class_1"]


def test_a_second_ctrl_c_raises_keyboard_interrupt(two_class: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.engine import training

    real_train = training.train

    def press_twice(epoch: int, step: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training, "train", lambda cfg, **kw: real_train(cfg, **{**kw, "on_step": press_twice}))
    with pytest.raises(KeyboardInterrupt):
        convlens.train(two_class, **_tiny(tmp_path))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- check
@pytest.fixture()
def dataset_with_a_bad_file(tmp_path: Path) -> Path:
    data = make_dataset(tmp_path / "data", classes=2, per_class=4)
    (data / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return data


def test_check_returns_a_report(dataset_with_a_bad_file: Path) -> None:
    report = convlens.check(dataset_with_a_bad_file, workers=1, progress=False)
    assert isinstance(report, convlens.CheckReport) and report.has_problems
    (finding,) = [f for f in report.findings() if f.severity == "unusable"]
    assert finding.items == ["class_0/broken.png"]
    page = report._repr_html_()
    assert "class_0/broken.png" in page and "problems found" in page and "<table>" in page


def test_check_prints_tab_separated_lines_when_piped(dataset_with_a_bad_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(dataset_with_a_bad_file), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "severity\tkind\tpath\tdetail"
    rows = [ln.split("\t") for ln in lines[1:]]
    assert all(len(r) == 4 for r in rows)
    assert ["unusable", rows[0][1], "class_0/broken.png"] == rows[0][:3]
    assert "problems found" in err and not {"─", "│"} & set(out)  # the summary is on stderr, no box on stdout


def test_check_draws_tables_on_a_terminal(dataset_with_a_bad_file: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: behave as on a terminal
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["check", str(dataset_with_a_bad_file), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "Findings" in out and "─" in out and "\t" not in out


# ----------------------------------------------------------------------------- evaluate, export, predict
def test_evaluate_and_export(finished: convlens.Run, two_class: Path, tmp_path: Path) -> None:
    ev = convlens.evaluate(finished.bundle_path, two_class, out=tmp_path / "eval")
    assert isinstance(ev, convlens.Evaluation)
    assert ev.images == 24 and 0.0 <= ev.accuracy <= 1.0 and ev.report_path.is_file()
    assert ev.metrics["per_class"].keys() == {"class_0", "class_1"}
    assert "accuracy" in ev._repr_html_() and "confusion matrix" in ev._repr_html_()
    onnx = convlens.export(finished.bundle_path, out=tmp_path / "m.onnx", say=None)
    assert onnx == tmp_path / "m.onnx" and onnx.is_file()
    clf = convlens.load(onnx)
    assert clf.predict(str(next((two_class / "class_0").iterdir())))[0].label in clf.classes


def test_predict_prints_tab_separated_lines_when_piped(finished: convlens.Run, two_class: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(finished.bundle_path), str(two_class), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "file\tlabel\tprobability\tnovelty\ttop-2"  # the run's bundle has a novelty index
    rows = [ln.split("\t") for ln in lines[1:]]
    assert len(rows) == 24
    for path, label, p, novelty, top in rows:
        assert Path(path).is_file() and label in ("class_0", "class_1", "unknown") and 0.5 <= float(p) <= 1.0
        assert float(novelty) >= 0 and top.split()[0] in ("class_0", "class_1")
        assert label == "unknown" or top.startswith(label)


def test_train_chooses_the_backbone_as_the_cli_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Colour photos with the default preset take the pretrained path from Python too; naming a
    model (or ``pretrained="none"``) keeps training from scratch."""
    from convlens.engine import recipe

    photos = make_dataset(tmp_path / "photos", classes=2, per_class=6, size=96)
    chosen: list[str] = []

    class Chosen(Exception):
        pass

    def record(backbone: Any, *_: Any) -> None:
        chosen.append(backbone.source.arch)
        raise Chosen

    monkeypatch.setattr(recipe, "backbone_layer", record)
    opts = {"cache_dir": str(tmp_path / "cache"), "project": str(tmp_path / "runs"), "console": _quiet()}
    with pytest.raises(Chosen):
        convlens.train(photos, **opts)
    assert chosen == ["efficientnet_lite0"]
    run = convlens.train(photos, model="tiny", image_size=16, epochs=1, workers=1, threads=1, **opts)
    assert run.config["pretrained"] == "none" and chosen == ["efficientnet_lite0"]


def test_load_does_not_import_the_training_stack() -> None:
    """``convlens.load`` is predict's: serving a bundle does not pull in audit, evaluate or scikit-learn."""
    code = "import sys, convlens; convlens.load; print('sklearn' in sys.modules, 'convlens.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
