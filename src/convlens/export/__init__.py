"""Export a model bundle to ONNX (fp32 or static int8) or TorchScript, verified before writing.

``convlens export BUNDLE --format onnx|torchscript [--out FILE] [--int8 --calibration DIR]
[--validate DIR]``. The exported ONNX file carries the bundle's metadata, so
``convlens predict model.onnx`` and ``convlens serve model.onnx`` need only onnxruntime, numpy
and Pillow (:class:`convlens.infer.onnx_backend.OnnxBackend`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convlens.callable_module import callable_module
from convlens.config import EXPORT_FORMATS as FORMATS
from convlens.config import check_choice
from convlens.errors import ConfigError


def default_output(bundle: str | os.PathLike[str], fmt: str, int8: bool = False) -> Path:
    """``run/model.convlens`` -> ``run/model.onnx`` / ``run/model.int8.onnx`` / ``run/model.torchscript.pt``."""
    b = Path(bundle)
    if b.is_dir():
        b = b / "model.convlens"
    stem = b.name[: -len(b.suffix)] if b.suffix else b.name
    suffix = {"onnx": ".int8.onnx" if int8 else ".onnx", "torchscript": ".torchscript.pt"}[fmt]
    return b.with_name(stem + suffix)


def resolve_output(bundle: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str] | None,
                   int8: bool = False) -> Path:
    """The file to write: ``out``, a file named after the bundle inside ``out`` if it is a folder,
    or beside the bundle when ``out`` is not given."""
    if out is None:
        return default_output(bundle, fmt, int8)
    o = Path(out)
    if o.is_dir():
        return o / default_output(bundle, fmt, int8).name
    if o.resolve() == Path(bundle).resolve():
        raise ConfigError(f"--out must not be the bundle itself. Received: out={str(out)!r}")
    return o


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def export_bundle(bundle: str | os.PathLike[str], format: str = "onnx", *, out: str | os.PathLike[str] | None = None,
                  int8: bool = False, calibration: str | os.PathLike[str] | None = None,
                  validate: str | os.PathLike[str] | None = None, say: Callable[[str], Any] | None = print) -> Path:
    """Export a bundle to ONNX (``int8=True``: static int8, calibrated on ``calibration``) or
    TorchScript, verified against PyTorch; return the written file.

    This is ``convlens.export(bundle, ...)`` and what ``convlens export`` runs. ``validate``: a
    labelled folder on which the accuracy of the exported model(s) is reported. ``say`` receives
    each line of the report (``None``: silent).
    """
    say = say or (lambda line: None)
    fmt = format
    from convlens.infer.bundle import read_meta

    check_choice("format", fmt, FORMATS)
    if int8 and fmt != "onnx":
        raise ConfigError(f"--int8 is only available for ONNX; drop it or use --format onnx. Received: format={fmt!r}")
    if int8 and not calibration:
        raise ConfigError("--int8 needs --calibration DIR (a folder of typical images, e.g. the training set). "
                          "Received: calibration=None")
    if calibration and not int8:
        raise ConfigError(f"--calibration is only used with --int8; add --int8. Received: calibration={str(calibration)!r}")
    if validate and fmt != "onnx":
        raise ConfigError(f"--validate compares ONNX models; use it with --format onnx. Received: format={fmt!r}")
    for name, folder in (("calibration", calibration), ("validate", validate)):
        if folder and not Path(folder).is_dir():
            raise ConfigError(f"--{name} must be an existing folder of images. Received: {name}={str(folder)!r}")

    meta = read_meta(bundle)  # fails fast, torch-free, with a one-line error for a bad bundle
    target = resolve_output(bundle, fmt, out, int8)

    if fmt == "torchscript":
        from convlens.export.torchscript import export_torchscript

        res = export_torchscript(bundle, target)
        say(f"exported {res.path} ({_mb(res.size_bytes)}, TorchScript trace): "
              f"max |torchscript - torch| = {res.max_abs_diff:.1e} on batches of 1 and 3")
        return res.path

    from convlens.export.onnx import accuracy_report, export_onnx, quantize_int8

    res, fp32 = export_onnx(bundle, None if int8 else target)
    extras = " + class maps" if "cam" in res.outputs else ""
    where = "built" if int8 else f"exported {res.path}"
    say(f"{where} fp32 ONNX ({_mb(res.size_bytes)}, opset {res.opset}, {res.exporter} exporter, "
          f"logits{extras}): max |onnxruntime - torch| = {res.max_abs_diff:.1e} on batches of 1 and 3")
    for note in res.notes:
        say(f"note: {note}")
    q: Any = None
    if int8:
        assert calibration is not None
        q, _ = quantize_int8(fp32, meta, calibration, target)
        say(f"exported {q.path} (int8 QDQ, {_mb(q.size_bytes)}, {_mb(res.size_bytes)} in fp32): "
              f"max |int8 - fp32| logit = {q.max_abs_diff:.3f} on the calibration images")
        for note in q.notes:
            say(f"note: {note}")
    if validate:
        models = {"fp32": _session_logits(fp32)}
        if q is not None:
            models["int8"] = _session_logits(target.read_bytes())
        rep = accuracy_report(validate, meta, models)
        acc = rep["accuracy"]
        line = f"validation on {rep['images']} images"
        if rep["skipped"]:
            line += f" ({rep['skipped']} unusable files skipped)"
        line += ": fp32 accuracy " + f"{acc['fp32']:.2%}"
        if "int8" in acc:
            line += (f", int8 accuracy {acc['int8']:.2%} (change {rep['change'] * 100:+.2f} points, "
                     f"same prediction on {rep['agreement']:.2%})")
        say(line)
    return target


def export_command(bundle: str | os.PathLike[str], fmt: str = "onnx", out: str | os.PathLike[str] | None = None,
                   int8: bool = False, calibration: str | os.PathLike[str] | None = None,
                   validate: str | os.PathLike[str] | None = None) -> int:
    """The ``convlens export`` verb: export, verify, optionally quantise and validate. Returns 0."""
    export_bundle(bundle, fmt, out=out, int8=int8, calibration=calibration, validate=validate)
    return 0


def _session_logits(model_bytes: bytes) -> Any:
    """A ``logits(x)`` function over an in-memory ONNX model."""
    from convlens.export.onnx import make_session
    from convlens.infer.onnx_backend import INPUT_NAME, LOGITS_NAME

    session = make_session(model_bytes)
    return lambda x: session.run([LOGITS_NAME], {INPUT_NAME: x})[0]


# `convlens.export(bundle, ...)` is the public verb: this package, when called, runs export_bundle.
callable_module(__name__, "export_bundle")
