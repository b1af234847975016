"""`python -m convlens train` in a subprocess: Ctrl-C writes a checkpoint, kill -9 leaves one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convlens.engine.checkpoint import load_checkpoint
from tests.engine.helpers import make_dataset

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _start(data: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "convlens", "train", str(data), "--preset", "quick", "--image-size", "16",
           "--batch-size", "8", "--workers", "1", "--threads", "1", "--cache-dir", str(tmp / "cache"),
           "--project", str(tmp / "runs"), "--name", "cli", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"process ended before {needle!r}: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError(f"no {needle!r} within {timeout} s")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cli") / "ds", classes=2, per_class=16)


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(data: Path, tmp_path: Path) -> None:
    proc = _start(data, tmp_path, "--epochs", "1000")
    try:
        _wait_for_line(proc, "run folder:")
        time.sleep(0.5)  # inside the first epochs
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    message = [ln for ln in err.splitlines() if ln.strip()]
    assert len(message) == 1 and "convlens train --resume" in message[0], err
    run = tmp_path / "runs" / "cli"
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 0 <= state["epoch"] < 1000 and state["config"]["epochs"] == 1000
    assert not (run / "model.convlens").exists()
    # Finish the run right after the interrupted epoch.
    done = subprocess.run([sys.executable, "-m", "convlens", "train", "--resume", str(run),
                           "--epochs", str(state["epoch"] + 1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run / "model.convlens").is_file() and (run / "report.html").is_file()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["finished"] is True


def test_kill_9_leaves_a_loadable_checkpoint(data: Path, tmp_path: Path) -> None:
    proc = _start(data, tmp_path, "--epochs", "1000")
    last = tmp_path / "runs" / "cli" / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert last.exists()
        time.sleep(0.37)  # checkpoints are written every few tens of ms: land anywhere in between
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    state = load_checkpoint(last)
    assert state["epoch"] >= 1 and state["step_in_epoch"] == 0
