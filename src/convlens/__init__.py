"""convlens: from a folder of images to a trained, explained, exported and served classifier.

The Python API mirrors the CLI's verbs (see :mod:`convlens.api`)::

    import convlens
    report = convlens.check("data")                  # CheckReport
    run = convlens.train("data", epochs=20)          # Run: run.history, run.metrics, run.load()
    ev = convlens.evaluate(run.bundle_path, "test")  # Evaluation
    onnx_path = convlens.export(run.bundle_path)     # Path
    clf = convlens.load("runs/train/model.convlens") # Classifier: clf.predict(...), clf.explain(...)

Every error convlens raises on purpose is a :class:`ConvlensError`. The names are imported on
first use, so ``import convlens`` stays instant (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from convlens.errors import ConvlensError
from convlens.version import __version__

__all__ = ["AuditReport", "CheckReport", "ConvlensError", "Evaluation", "Run", "__version__", "audit", "check",
           "evaluate", "export", "load", "train"]

# Name -> module that defines it, imported on first access (PEP 562).
# Nothing else is imported here: submodules import `convlens` for __version__, and type checkers
# read the names' types from __init__.pyi.
_LAZY = {name: "convlens.api" for name in ("check", "train", "AuditReport", "Run", "CheckReport", "Evaluation")}
_LAZY["load"] = "convlens.infer"  # the API's load is the inference core's: without audit, evaluate and sklearn
# `audit`, `evaluate` and `export` are also sub-packages; they are callable and run their verb.
_CALLABLE_PACKAGES = ("audit", "evaluate", "export")


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"convlens.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

