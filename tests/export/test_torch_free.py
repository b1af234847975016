"""``convlens predict model.onnx`` must run where torch (and the exporter's packages) cannot be
imported: a subprocess installs an import hook that refuses them and records every attempt."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from convlens.infer import load
from tests.bundles import write_images

BLOCKED = ["torch", "torchvision", "onnx", "onnxscript", "kornia", "sklearn", "safetensors",
           "matplotlib", "fastapi", "scipy"]

# Runs in the child: refuse the blocked packages, run the command, report what was attempted.
CHILD = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = set(json.loads(sys.argv[1]))
    attempts = []

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    from convlens.cli import main
    rc = main(sys.argv[3:])
    if sys.argv[2]:
        from convlens.infer import load
        p = load(sys.argv[3 + 1]).predict(sys.argv[-1])[0]
        print("PROBS=" + json.dumps(p.probabilities))
    print("ATTEMPTS=" + json.dumps(attempts))
    sys.exit(rc)
""")


def _run(args: list[str], api: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(BLOCKED), "1" if api else "", *args],
                          capture_output=True, text=True, timeout=120)


def test_onnx_predict_never_imports_torch(tiny_onnx: Path, tmp_path: Path) -> None:
    (photo,) = write_images(tmp_path, 1, seed=3, fmt="JPEG")
    proc = _run(["predict", str(tiny_onnx), str(photo)], api=True)
    assert proc.returncode == 0, proc.stderr
    assert "img000.jpg" in proc.stdout and ("cats" in proc.stdout or "dogs" in proc.stdout)
    attempts = json.loads(proc.stdout.split("ATTEMPTS=")[1].strip())
    assert attempts == [], f"the ONNX path tried to import {attempts}"
    probs = json.loads(proc.stdout.split("PROBS=")[1].splitlines()[0])
    # Same numbers as this (torch-enabled) process gets from the same file.
    here = load(tiny_onnx).predict(photo)[0].probabilities
    np.testing.assert_allclose([probs[c] for c in ("cats", "dogs")], [here["cats"], here["dogs"]], atol=1e-6)


def test_the_hook_really_blocks_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    """Control: the bundle path needs torch, so under the hook it fails: the hook is effective."""
    (photo,) = write_images(tmp_path, 1, seed=3)
    proc = _run(["--debug", "predict", str(tiny_bundle), str(photo)])
    assert proc.returncode != 0
    assert "blocked in this test" in proc.stderr
