"""The command line: help, version, one-line errors with exit code 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from convlens import __version__
from convlens.cli import build_parser, main

VERBS = ["summary", "check", "preview", "train", "lr-find", "evaluate", "predict", "explain", "export", "serve",
         "inspect", "demo-layer"]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"convlens {__version__}"


def test_help_lists_every_verb(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_shows_defaults(verb, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: convlens {verb}" in out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[verb]
    for action in sub._actions:
        if action.option_strings and action.dest not in ("help",) and action.help:
            assert "(default:" in (action.help or "") or "default" in sub.format_help()


def test_train_help_states_preset_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (default: 0.2)" in out
    assert "--flip, --no-flip" in out


def test_unknown_flag_is_one_line_with_suggestion(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--epoch", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "unrecognized arguments: --epoch" in err and "Did you mean '--epochs'" in err


def test_bad_config_value_is_one_line_exit_2(capsys) -> None:
    code = main(["train", "--optimizer", "adamx"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "convlens train: error: optimizer must be one of rmsprop, sgd, adam, adamw. "
        "Received: optimizer='adamx'. Did you mean 'adam'?"
    )


def test_no_verb_prints_help_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "usage: convlens" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "convlens", "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == f"convlens {__version__}"


def test_user_error_shows_no_traceback_unless_debug(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    cmd = [sys.executable, "-m", "convlens", "train", "--config", str(missing)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = subprocess.run([cmd[0], "-m", "convlens", "--debug", *cmd[3:]], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "Traceback" in r.stderr
