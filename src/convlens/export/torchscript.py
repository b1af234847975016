"""Export a bundle to TorchScript (``torch.jit.trace``), verified against the eager model.

TorchScript is deprecated upstream in favour of ``torch.export``; it is kept because C++
(libtorch) and older mobile runtimes still load it. convlens models are plain feed-forward
conv nets without data-dependent control flow, so tracing records them exactly; the traced
module is checked on two batch sizes after a save/load round trip, so a shape baked into the
trace cannot slip through. The bundle's metadata travels inside the archive as the extra file
``convlens.json`` (``torch.jit.load(path, _extra_files={"convlens.json": ""})``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convlens import __version__
from convlens.errors import first_line
from convlens.export.onnx import DEFAULT_ATOL, ExportError, ExportResult, sample_inputs
from convlens.files import write_bytes

EXTRA_FILE = "convlens.json"


@contextlib.contextmanager
def _no_jit_deprecation() -> Iterator[None]:
    # torch.jit.* print a DeprecationWarning on every call; the user chose this format.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def export_torchscript(bundle: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       atol: float = DEFAULT_ATOL) -> ExportResult:
    """Trace ``bundle``'s model (logits output) and write it atomically to ``out``."""
    import torch

    from convlens.infer.bundle import load_model

    model, meta = load_model(bundle, "cpu")
    model = model.float().eval()
    prep = meta.preprocessing
    example = torch.from_numpy(sample_inputs(prep, (2,), seed=1)[0])
    with _no_jit_deprecation(), torch.no_grad():
        try:
            traced = torch.jit.trace(model, (example,), check_trace=True)
        except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
            raise ExportError(f"TorchScript tracing failed ({first_line(e)}); "
                              "use `--format onnx` instead") from e
        doc = meta.to_json()
        doc["export"] = {"format": "torchscript", "method": "trace", "outputs": ["logits"],
                         "torch": torch.__version__, "convlens": __version__,
                         "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={EXTRA_FILE: json.dumps(doc, default=str)})
        data = buf.getvalue()
        # Verify what will be on disk, not the in-memory trace.
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        worst = 0.0
        for x in sample_inputs(prep, (1, 3), seed=0):
            xt = torch.from_numpy(x)
            ref, got = model(xt), loaded(xt)
            if tuple(ref.shape) != tuple(got.shape):
                raise ExportError(f"TorchScript output has shape {tuple(got.shape)} but the model gives "
                                  f"{tuple(ref.shape)} for a batch of {len(x)}; use `--format onnx`")
            worst = max(worst, float(np.max(np.abs(ref.numpy() - got.numpy()))))
    if worst > atol:
        raise ExportError(f"TorchScript outputs differ from PyTorch by {worst:.2e} (> {atol:g}); "
                          "the model was not written. Use `--format onnx`")
    write_bytes(out, data)
    return ExportResult(Path(out), "torchscript", len(data), worst, "torch.jit.trace", None, ["logits"])


def load_torchscript_meta(path: str | os.PathLike[str]) -> dict[str, object]:
    """The metadata JSON stored in a convlens TorchScript file (loads the module to read it)."""
    import torch

    extra = {EXTRA_FILE: ""}
    with _no_jit_deprecation():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[EXTRA_FILE]
    if not raw:
        raise ExportError(f"{str(path)!r} has no {EXTRA_FILE}; it was not exported by convlens")
    return json.loads(raw)
