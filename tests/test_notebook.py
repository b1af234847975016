"""examples/python_api.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel).

The notebook is written for the full cats_and_dogs_filtered and the default recipe; this test
replaces its ``parameters`` cell: a temporary copy of 6 real photos per class and subset, and a
one-epoch 32-pixel run with everything written under a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "python_api.ipynb"
SUBSETS = ("train/cats", "train/dogs", "validation/cats", "validation/dogs")
PER_FOLDER = 6


def _parameters(data: Path, tmp: Path) -> str:
    options = {"image_size": 32, "epochs": 1, "batch_size": 8, "workers": 1, "threads": 1,
               "cache_dir": str(tmp / "cache")}
    return (f"from pathlib import Path\n\nDATA = Path({str(data)!r})\nOPTIONS = {options!r}\n")


def _outputs(cell: dict, kind: str) -> str:
    """All of a cell's outputs of one MIME type (or stream text), joined."""
    parts = []
    for out in cell.get("outputs", []):
        if kind == "stream" and out["output_type"] == "stream":
            parts.append(out["text"])
        elif kind in out.get("data", {}):
            parts.append(out["data"][kind])
    return "".join(parts)


def test_notebook_runs(cats_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    data = tmp_path / "cats_and_dogs_filtered"
    for sub in SUBSETS:
        (data / sub).mkdir(parents=True)
        for f in sorted((cats_dogs / sub).iterdir())[:PER_FOLDER]:
            shutil.copyfile(f, data / sub / f.name)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = _parameters(data, tmp_path)
    # The kernel is a child process: let it import this checkout's convlens.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CONVLENS_WORKERS", "1")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    by_source = {c.source.split("\n")[0]: c for c in nb.cells if c.cell_type == "code"}
    assert "Did you mean 'epochs'?" in _outputs(by_source["try:"], "stream")
    report = _outputs(by_source["report = convlens.check(DATA)"], "text/html")
    assert "cats" in report and "<table>" in report
    run_html = _outputs(by_source['run = convlens.train(DATA, name="notebook", **OPTIONS)'], "text/html")
    assert "finished" in run_html and "val_accuracy" in run_html and "data:image/png;base64," in run_html
    assert "val_acc" in _outputs(by_source["run.history_frame()  # needs pandas; run.history is the same as a "
                                           "list of dicts"], "text/html")
    assert "iframe" in _outputs(by_source["import html"], "text/html")
    assert "accuracy" in _outputs(by_source["evaluation = convlens.evaluate(run.bundle_path, DATA)"], "text/html")
    assert _outputs(by_source["import matplotlib.pyplot as plt"], "image/png")  # the explanations figure
    run_dir = tmp_path / "runs" / "notebook"
    assert (run_dir / "model.convlens").is_file() and (run_dir / "model.onnx").is_file()
    assert "model.onnx" in json.dumps(by_source["onnx_path = convlens.export(run.bundle_path)"].outputs)


def test_interrupt_kernel_checkpoints_and_returns_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jupyter's "interrupt kernel" (SIGINT to the kernel) during convlens.train: a checkpoint, an
    interrupted Run, and the kernel ready for the next cell."""
    import queue
    import time

    pytest.importorskip("ipykernel")
    manager = pytest.importorskip("jupyter_client.manager")
    from tests.engine.helpers import make_dataset

    data = make_dataset(tmp_path / "data", classes=2, per_class=8)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        # Thousands of epochs: the run is still going when the interrupt arrives.
        code = ("import convlens\n"
                f"run = convlens.train({str(data)!r}, preset='quick', image_size=16, epochs=5000, batch_size=8, "
                f"workers=1, threads=1, cache_dir={str(tmp_path / 'cache')!r})\n"
                "print('RESULT', run.interrupted, run.checkpoint.is_file(), run.bundle_path, len(run.history) >= 2)")
        msg_id = kc.execute(code)
        texts, interrupted, deadline = [], False, time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            texts.append(content.get("text") or (content.get("data") or {}).get("text/plain", ""))
            if msg["msg_type"] == "error":
                texts.append(f"{content['ename']}: {content['evalue']}")
            if not interrupted and "epoch 2/" in texts[-1]:
                km.interrupt_kernel()  # what Kernel -> Interrupt does
                interrupted = True
            if msg["msg_type"] == "status" and content["execution_state"] == "idle":
                break
        out = "".join(texts)
        assert interrupted, out[-2000:]
        assert "RESULT True True None True" in out, out[-2000:]
        assert "Continue with run.resume()" in out
        reply = kc.execute_interactive("print(run.resume(epochs=3).status)", timeout=120)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
