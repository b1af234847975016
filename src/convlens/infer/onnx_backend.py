"""Run an exported ``model.onnx`` with onnxruntime alone: numpy, onnxruntime and Pillow only.

Nothing here (nor anything it imports) may import torch: ``convlens predict model.onnx`` and
``convlens serve model.onnx`` must work on a machine where only the runtime is installed. The
model's :class:`~convlens.infer.bundle.BundleMeta` (classes, preprocessing, output activation...) is
read from the ONNX metadata key ``"convlens"`` that :func:`convlens.export.onnx.export_onnx`
writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convlens.data.preprocess import Preprocessing
from convlens.errors import BundleError, first_line
from convlens.infer.bundle import BundleMeta

METADATA_KEY = "convlens"
INPUT_NAME = "input"
LOGITS_NAME = "logits"
# Optional second output: per-class activation maps (N, out_units, h, w) computed inside the
# graph from the last feature map and the dense weights (exact CAM for GAP + dense heads).
CAM_NAME = "cam"
# Optional output of a model whose bundle has a novelty index: the novelty score (N), computed
# in the graph from the pooled features and the training features (an fp16 initializer).
NOVELTY_NAME = "novelty"
# Optional output of the onnx engine's cached export (convlens.infer.engine), in place of novelty:
# the pooled features (N x C), scored by the bundle's novelty index in numpy as the torch backend's are.
POOLED_NAME = "pooled"


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise BundleError("running an ONNX model needs onnxruntime; install it with `pip install onnxruntime`") from e
    return ort


def session_options(threads: int | None = None) -> Any:
    """The ``onnxruntime.SessionOptions`` every session here is made with: ``threads`` intra-op
    threads (None: :func:`convlens.runtime.inference_threads`; 0: onnxruntime's default), one
    inter-op thread (the graph is a chain), warnings off."""
    from convlens.runtime import inference_threads

    opts = _import_ort().SessionOptions()
    threads = inference_threads() if threads is None else int(threads)
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # Quiet: onnxruntime's warnings about unused initializers are noise for users.
    opts.log_severity_level = 3
    return opts


class OnnxBackend:
    """A :class:`convlens.infer.Backend` over an onnxruntime ``InferenceSession``.

    ``logits(x)`` takes normalised float32 NCHW input (``Preprocessing.normalize``) and returns
    ``(N, out_units)`` logits. Sessions are thread-safe for ``run``; ``threads`` bounds the
    intra-op thread pool (None: this process's inference threads, as torch gets them,
    :func:`convlens.runtime.inference_threads`, which ``serve --workers N`` divides; 0:
    onnxruntime's own default).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        ort = _import_ort()
        p = Path(path)
        self.path = p
        if not p.is_file():
            raise BundleError(f"ONNX model {str(p)!r} does not exist; check the path or run `convlens export BUNDLE`")
        try:
            self.session = ort.InferenceSession(
                str(p), sess_options=session_options(threads), providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (unexported) types
            raise BundleError(f"{str(p)!r} is not a loadable ONNX model ({first_line(e)}); "
                              "export it again with `convlens export`") from e
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise BundleError(f"{str(p)!r} has no convlens metadata (ONNX metadata key {METADATA_KEY!r}); "
                              "export it with `convlens export BUNDLE --format onnx`")
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BundleError(f"{str(p)!r} has damaged convlens metadata ({e}); export it again") from e
        self.meta: BundleMeta = BundleMeta.from_json(doc, str(p))
        self.export_info: dict[str, Any] = dict(doc.get("export") or {})
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BundleError(f"{str(p)!r} has {len(inputs)} inputs; a convlens ONNX model has one ({INPUT_NAME!r})")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if LOGITS_NAME not in self.output_names:
            raise BundleError(f"{str(p)!r} has no {LOGITS_NAME!r} output (outputs: {self.output_names}); export it again")
        # A graph with ``pooled`` (the onnx engine's export) leaves novelty to the bundle's index.
        if POOLED_NAME not in self.output_names and (self.meta.novelty is not None) != (NOVELTY_NAME in self.output_names):
            raise BundleError(f"{str(p)!r}: its novelty output and metadata do not match (outputs: {self.output_names}, "
                              f"novelty metadata {'present' if self.meta.novelty else 'absent'}); export it again")

    @property
    def has_cam(self) -> bool:
        """True when the graph also outputs class activation maps (exact CAM)."""
        return CAM_NAME in self.output_names

    @property
    def explain_methods(self) -> tuple[str, ...]:
        """The class maps this model can draw: the exact CAM when the graph outputs it."""
        return ("cam",) if self.has_cam else ()

    def class_maps(self, x: np.ndarray, method: str, class_index: list[int]) -> np.ndarray:
        """Raw CAM ``(N, h, w)`` of ``class_index`` (one per image) from the graph's ``cam`` output."""
        if method not in self.explain_methods:
            raise BundleError(f"{self.path.name} cannot draw {method!r} maps; explain with the .convlens bundle")
        _, cam = self.logits_and_cam(x)
        idx = np.asarray(class_index, dtype=np.int64)
        if cam.shape[1] == 1:  # one sigmoid unit: class 0's map is the negative of class 1's
            return cam[:, 0] * np.where(idx == 1, 1.0, -1.0).astype(np.float32)[:, None, None]
        return cam[np.arange(len(cam)), idx]

    @property
    def has_novelty(self) -> bool:
        """True when the graph outputs ``novelty`` (its bundle had a novelty index)."""
        return NOVELTY_NAME in self.output_names

    def image_novelty(self, images: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC images -> ``(logits, novelty)``, both from one run of the graph."""
        if not self.has_novelty:
            raise BundleError(f"{self.path.name} has no {NOVELTY_NAME!r} output; its bundle had no novelty index")
        logits, novelty = self._run(prep.normalize(images), NOVELTY_NAME)
        return logits, novelty

    def image_outputs(self, images: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC images -> ``(logits, pooled)`` from one run (a graph with a ``pooled`` output)."""
        if POOLED_NAME not in self.output_names:
            raise BundleError(f"{self.path.name} has no {POOLED_NAME!r} output; use its .convlens bundle")
        logits, pooled = self._run(prep.normalize(images), POOLED_NAME)
        return logits, pooled

    @property
    def int8(self) -> bool:
        return bool(self.export_info.get("int8", False))

    def _run(self, x: np.ndarray, *also: str) -> list[np.ndarray]:
        """The logits and the outputs ``also`` of normalised input ``x`` (checked), as float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        h, w = self.meta.preprocessing.size
        want = (self.meta.preprocessing.channels, h, w)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"ONNX model input must be N x {want[0]} x {h} x {w} float32. Received: shape={x.shape}")
        outs = self.session.run([LOGITS_NAME, *also], {self.input_name: x})
        return [np.asarray(o, dtype=np.float32) for o in outs]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 NCHW input -> ``(N, out_units)`` float32 logits."""
        return self._run(x)[0]

    def image_logits(self, images: np.ndarray, prep: Preprocessing) -> np.ndarray:
        """uint8 NHWC images -> logits, normalised by ``prep`` (the bundle's preprocessing)."""
        return self.logits(prep.normalize(images))

    def logits_and_cam(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the raw class maps ``(N, out_units, h, w)`` (unnormalised, before any ReLU).

        For a one-unit (sigmoid) model the map of class 1 is ``cam[:, 0]`` and that of class 0
        is its negative. Raises ``BundleError`` when the model was exported without maps.
        """
        if not self.has_cam:
            raise BundleError(f"{self.path.name} has no class activation output (its head is not "
                              "global-average-pool + dense); explain with the .convlens bundle instead")
        logits, cam = self._run(x, CAM_NAME)
        return logits, cam
