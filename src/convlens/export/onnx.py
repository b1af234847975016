"""Export a bundle to ONNX (fp32, optionally int8), verified against PyTorch.

Exporter choice: torch 2.9+ made the ``torch.export``-based exporter (``dynamo=True``, written
with onnxscript) the default and deprecated the TorchScript-based one, which prints "will be
removed". We use the dynamo exporter first because it is the one PyTorch maintains and it
handles the same operators for convlens' conv nets; it is slower to start (~3 s of tracing),
which does not matter for a one-off export. If it fails on some unusual layer, we fall back to
the legacy exporter (``dynamo=False``) while it still exists, and say so. Either way the result
is only written after onnxruntime reproduces PyTorch's outputs within ``atol``.

The graph has one input ``input`` (N x C x H x W, normalised float32, dynamic N) and the
outputs ``logits``; when the head is global-average-pool + dense, ``cam``: the exact class
activation maps ``W @ features`` as a 1x1 convolution, so ONNX models can be explained without
torch; and when the bundle has a novelty index, ``novelty`` (N): the pooled features as unit
rows, their cosine similarity to the training features (an fp16 initializer cast to fp32 in the
graph, so the file grows by the index's own size), the k-th largest by ``TopK``, ``1 - s``
clipped to [0, 2], checked against :meth:`NoveltyIndex.scores` of PyTorch's pooled features.
The bundle's metadata (``BundleMeta.to_json()``, which carries the novelty threshold, plus an
``export`` record) is stored as JSON under the ONNX metadata key ``"convlens"``. The training
images' paths stay in the bundle (``--neighbours`` needs it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens import __version__, decision
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import labelled_files, list_images
from convlens.errors import DataError, ImageError, UserError, first_line
from convlens.files import write_bytes
from convlens.infer.bundle import BundleMeta
from convlens.infer.novelty import NoveltyIndex
from convlens.infer.onnx_backend import (
    CAM_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    METADATA_KEY,
    NOVELTY_NAME,
    POOLED_NAME,
    session_options,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

DEFAULT_ATOL = 1e-4
# Opset for the legacy fallback exporter; the dynamo exporter picks its own (20 in torch 2.13),
# both well inside what onnxruntime >= 1.18 runs.
LEGACY_OPSET = 18
MAX_BATCH = 65536


class ExportError(UserError):
    """An export that could not be produced or did not reproduce PyTorch's outputs."""


@dataclass
class ExportResult:
    """What an export wrote and how well it matched its reference."""

    path: Path | None  # None when the model was only built in memory
    format: str  # "onnx", "onnx-int8" or "torchscript"
    size_bytes: int
    max_abs_diff: float  # against PyTorch (fp32 exports) or against the fp32 ONNX (int8)
    exporter: str = ""
    opset: int | None = None
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- sample inputs
def sample_inputs(prep: Preprocessing, batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> list[np.ndarray]:
    """Deterministic random images through the bundle's own normalisation, one batch per size.

    Two batch sizes check the dynamic batch axis as well as the numbers.
    """
    rng = np.random.default_rng(seed)
    h, w = prep.size
    return [prep.normalize(rng.integers(0, 256, size=(n, h, w, prep.channels), dtype=np.uint8))
            for n in batch_sizes]


# ----------------------------------------------------------------------------- torch side
def _novelty_module(index: NoveltyIndex) -> torch.nn.Module:
    """Pooled features -> :meth:`NoveltyIndex.scores`, in torch operators ONNX has."""
    import torch

    class Novelty(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # fp16 in the file, as in the bundle; cast to fp32 where it is used.
            self.register_buffer("reference", torch.from_numpy(np.ascontiguousarray(index.reference.T)))
            self.k = int(index.k)

        def forward(self, pooled: torch.Tensor) -> torch.Tensor:
            # sqrt of a sum, not norm(): onnxruntime's shape inference (int8 pre-processing) knows these.
            unit = pooled / (pooled * pooled).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
            sims = unit @ self.reference.float()
            kth = torch.topk(sims, self.k, dim=1).values[:, self.k - 1:]  # the k-th largest, N x 1
            return (1.0 - kth).clamp(0.0, 2.0).squeeze(1)

    return Novelty().eval()


def _export_module(model: torch.nn.Module, with_cam: bool, index: NoveltyIndex | None = None,
                   pooled: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """The module to export (the model, or one returning ``(logits[, cam][, novelty][, pooled])``)
    and its output names."""
    import torch
    import torch.nn.functional as F

    linear = model.gap_linear_head() if with_cam and hasattr(model, "gap_linear_head") else None
    novelty = _novelty_module(index) if index is not None else None

    class _Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.linear = linear
            self.novelty = novelty
            self.pooled = pooled

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if self.linear is None:
                logits, pooled = self.model.forward_pooled(x)
                outs = [logits]
            else:
                features = self.model.forward_features(x)
                pooled = features.mean(dim=(2, 3))
                # W @ f at every position, as a 1x1 conv (no bias): the exact CAM of Zhou et al.
                outs = [self.model.forward_head(features), F.conv2d(features, self.linear.weight[:, :, None, None])]
            if self.novelty is not None:
                outs.append(self.novelty(pooled))
            if self.pooled:
                outs.append(pooled)
            return tuple(outs)

    if linear is None and novelty is None and not pooled:
        return model.eval(), [LOGITS_NAME]
    names = [LOGITS_NAME, *([CAM_NAME] if linear is not None else []), *([NOVELTY_NAME] if novelty is not None else []),
             *([POOLED_NAME] if pooled else [])]
    return _Outputs().eval(), names


def _reference_fp16(proto: onnx.ModelProto, ref16: np.ndarray) -> None:
    """Store the training features ``ref16`` as the fp16 initializer they are, cast to fp32 by a
    ``Cast`` node: the exporter (and int8 pre-processing) fold ``reference.float()`` into an fp32
    constant twice the size."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    for init in graph.initializer:
        if (tuple(init.dims) == ref16.shape and init.data_type == onnx.TensorProto.FLOAT
                and np.array_equal(numpy_helper.to_array(init), ref16.astype(np.float32))):
            name = init.name
            graph.initializer.remove(init)
            graph.initializer.append(numpy_helper.from_array(ref16, f"{name}_fp16"))
            graph.node.insert(0, onnx.helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                                       name=f"{name}_cast"))
            return
    # Already fp16 + Cast (nothing was folded), or a new exporter's layout: either way correct.


def _reference_outputs(module: torch.nn.Module, model: torch.nn.Module, names: list[str],
                       index: NoveltyIndex | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """What ONNX must reproduce: the module's logits (and maps), and novelty as the numpy index
    scores PyTorch's pooled features (the prediction path's own computation), and those pooled
    features themselves."""
    import torch

    def reference(x: np.ndarray) -> list[np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x))
        with torch.inference_mode():
            out = module(t)
            pooled = model.forward_pooled(t)[1] if index is not None or POOLED_NAME in names else None
        outs = [o.detach().float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
        if pooled is not None:
            pooled = pooled.float().numpy().reshape(len(x), -1)
            if index is not None:
                outs[names.index(NOVELTY_NAME)] = index.scores(pooled)
            if POOLED_NAME in names:
                outs[names.index(POOLED_NAME)] = pooled
        return outs

    return reference


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's deprecation warnings and its "torchvision is not installed" logs."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _torch_to_onnx(module: torch.nn.Module, example: torch.Tensor, output_names: list[str],
                   notes: list[str]) -> tuple[onnx.ModelProto, str]:
    """Export with the dynamo exporter, falling back to the legacy one; returns (proto, name)."""
    import onnx
    import torch

    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, (example,), dynamo=True, verbose=False, external_data=False,
                input_names=[INPUT_NAME], output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
            )
            proto = program.model_proto
        return proto, "dynamo"
    except Exception as e:  # noqa: BLE001 - any failure of the new exporter means: try the old one
        notes.append(f"torch.export-based exporter failed ({first_line(e)}); "
                     "used the legacy exporter")
    if not hasattr(torch.onnx, "export"):  # pragma: no cover
        raise ExportError("this PyTorch has no ONNX exporter; install torch>=2.3 with onnxscript")
    buf = io.BytesIO()
    dynamic = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(module, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                              output_names=output_names, dynamic_axes=dynamic,
                              opset_version=LEGACY_OPSET, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export failed with both exporters ({first_line(e)}); "
                          "try `--format torchscript` or report the model's layers") from e
    return onnx.load_from_string(buf.getvalue()), "legacy"


# ----------------------------------------------------------------------------- onnx side
def make_session(model_bytes: bytes) -> Any:
    """An onnxruntime CPU session over an in-memory model (onnxruntime's default threads)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model_bytes, sess_options=session_options(0), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's exception types are not exported
        raise ExportError(f"onnxruntime cannot load the exported graph ({first_line(e)}); "
                          "upgrade onnxruntime or report the model's layers") from e


def compare_outputs(reference: Callable[[np.ndarray], list[np.ndarray]], session: Any,
                    inputs: list[np.ndarray], names: list[str]) -> dict[str, float]:
    """Largest absolute difference per output between ``reference(x)`` and the ONNX session.

    Class maps are compared relative to their magnitude (they are sums over channels, so their
    scale, unlike the logits', grows with the feature count).
    """
    worst = {n: 0.0 for n in names}
    for x in inputs:
        ref = reference(x)
        got = session.run(names, {INPUT_NAME: x})
        for n, r, g in zip(names, ref, got, strict=True):
            if r.shape != g.shape:
                raise ExportError(f"ONNX output {n!r} has shape {g.shape} but PyTorch gives {r.shape} "
                                  f"for a batch of {len(x)}; the batch axis did not export as dynamic")
            diff = float(np.max(np.abs(r - g))) if r.size else 0.0
            if n == CAM_NAME:
                diff /= max(1.0, float(np.max(np.abs(r))))
            worst[n] = max(worst[n], diff)
    return worst


def set_metadata(proto: onnx.ModelProto, meta: BundleMeta, export_info: dict[str, Any]) -> None:
    """Store the bundle metadata as JSON under the ``"convlens"`` key (replacing any old one)."""
    doc = meta.to_json()
    doc["export"] = export_info
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(doc, default=str)
    proto.producer_name = "convlens"
    proto.producer_version = __version__
    proto.doc_string = f"convlens classifier: {', '.join(meta.classes)}"


def _opset(proto: onnx.ModelProto) -> int | None:
    versions = [int(imp.version) for imp in proto.opset_import if imp.domain in ("", "ai.onnx")]
    return versions[0] if versions else None


def export_onnx(bundle: str | os.PathLike[str], out: str | os.PathLike[str] | None, *,
                atol: float = DEFAULT_ATOL, with_cam: bool = True, pooled: bool = False,
                extra_info: dict[str, Any] | None = None) -> tuple[ExportResult, bytes]:
    """Export ``bundle`` to fp32 ONNX at ``out`` (atomically) after checking it against PyTorch.

    Returns the result and the model's bytes; with ``out=None`` nothing is written (the int8
    path quantises the bytes and writes only its own file). ``pooled``: output the pooled
    features (``pooled``, N x C) instead of ``novelty``: the onnx engine's novelty index and
    ``--neighbours`` score them in numpy. ``extra_info`` joins the ``export`` record. Raises
    :class:`ExportError` when onnxruntime's outputs differ from PyTorch's by more than ``atol``.
    """
    import torch

    from convlens.infer.bundle import load_model, read_novelty

    model, meta = load_model(bundle, "cpu")
    index = None if pooled else read_novelty(bundle, meta)
    model = model.float().eval()
    prep = meta.preprocessing
    notes: list[str] = []
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1.
    example = torch.from_numpy(sample_inputs(prep, (2,), seed=1)[0])
    inputs = sample_inputs(prep, (1, 3), seed=0)
    for cam in ((True, False) if with_cam else (False,)):
        module, names = _export_module(model, cam, index, pooled)
        proto, exporter = _torch_to_onnx(module, example, names, notes)
        if index is not None:
            _reference_fp16(proto, np.ascontiguousarray(index.reference.T))
        session = make_session(proto.SerializeToString())
        diffs = compare_outputs(_reference_outputs(module, model, names, index), session, inputs, names)
        for name in (LOGITS_NAME, NOVELTY_NAME, POOLED_NAME):
            if diffs.get(name, 0.0) > atol:
                raise ExportError(f"ONNX {name} differ from PyTorch by {diffs[name]:.2e} (> {atol:g}) with the "
                                  f"{exporter} exporter; the model was not written. Report the model's layers")
        if CAM_NAME not in diffs or diffs[CAM_NAME] <= atol:
            break
        # The logits are right, so the file is still useful: export again without the maps.
        notes.append(f"class maps differed from PyTorch by {diffs[CAM_NAME]:.1e}; exported logits only")

    info = {"format": "onnx", "int8": False, "exporter": exporter, "opset": _opset(proto),
            "outputs": names, "max_abs_diff": diffs[LOGITS_NAME], "torch": torch.__version__,
            **{f"{n}_max_abs_diff": diffs[n] for n in (NOVELTY_NAME, POOLED_NAME) if n in diffs},
            "convlens": __version__, "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra_info or {})}
    set_metadata(proto, meta, info)
    data = proto.SerializeToString()
    if out is not None:
        write_bytes(out, data)
    return ExportResult(Path(out) if out is not None else None, "onnx", len(data), diffs[LOGITS_NAME],
                        exporter, info["opset"], names, notes), data


# ----------------------------------------------------------------------------- int8
def calibration_images(root: str | os.PathLike[str]) -> list[Path]:
    """Candidate images under ``root`` by the one folder scanner's rules (content decides later)."""
    if not Path(root).is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder. Received: {str(root)!r}")
    return list_images(root)[0]


def _load_images(paths: Sequence[Path], prep: Preprocessing, skipped: list[ImageError]) -> Iterator[tuple[int, np.ndarray]]:
    for i, p in enumerate(paths):
        try:
            yield i, prep.load(p)
        except ImageError as e:
            skipped.append(e)


class ImageFolderReader:
    """An onnxruntime ``CalibrationDataReader`` over a folder of images.

    Images go through the bundle's own :class:`Preprocessing` (decode, resize, normalise), so
    calibration sees exactly what the model will see. Unusable files are skipped and counted.
    """

    def __init__(self, folder: str | os.PathLike[str], prep: Preprocessing, *,
                 max_images: int = 256, batch_size: int = 16) -> None:
        paths = calibration_images(folder)
        if len(paths) > max_images:
            # An even spread over the sorted list keeps every class folder represented.
            idx = np.linspace(0, len(paths) - 1, max_images).round().astype(int)
            paths = [paths[i] for i in sorted(set(idx.tolist()))]
        self.skipped: list[ImageError] = []
        arrays = [a for _, a in _load_images(paths, prep, self.skipped)]
        if not arrays:
            raise DataError(f"calibration folder {str(folder)!r} has no usable images "
                            f"({len(self.skipped)} unusable); pass a folder of the model's kind of photos")
        self.count = len(arrays)
        self.batches = [prep.normalize(np.stack(arrays[i:i + batch_size]))
                         for i in range(0, len(arrays), batch_size)]
        self._it = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32: bytes, meta: BundleMeta, calibration: str | os.PathLike[str],
                  out: str | os.PathLike[str], *, max_images: int = 256) -> tuple[ExportResult, bytes]:
    """Post-training static int8 quantisation (QDQ, per-channel weights) calibrated on a folder.

    Activations are uint8 and weights int8 (onnxruntime's recommended U8S8 for CPUs); ranges
    come from MinMax calibration over the bundle-preprocessed calibration images.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    prep = meta.preprocessing
    reader = ImageFolderReader(calibration, prep, max_images=max_images)

    class _Reader(CalibrationDataReader):  # onnxruntime checks isinstance
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convlens-int8-") as tmp:
        src, pre, dst = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(fp32)
        try:
            # Shape inference + graph optimisation first, as onnxruntime recommends.
            from onnxruntime.quantization.shape_inference import quant_pre_process

            with _quiet_exporter():
                quant_pre_process(src, pre)
        except Exception as e:  # noqa: BLE001 - pre-processing is an optimisation only
            notes.append(f"quantisation pre-processing skipped ({first_line(e, 120)})")
            pre = src
        try:
            with _quiet_exporter():
                quantize_static(pre, dst, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax,
                                nodes_to_exclude=novelty_only_nodes(onnx.load(pre)))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"int8 quantisation failed ({first_line(e)}); "
                              "export without --int8") from e
        proto = onnx.load(dst)
    from onnx import numpy_helper

    fp32_proto = onnx.load_from_string(fp32)
    for init in fp32_proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT16 and init.name.endswith("_fp16"):
            _reference_fp16(proto, numpy_helper.to_array(init))  # the training features, unquantised

    names = [o.name for o in proto.graph.output]
    # Compare on real (calibration) images: random noise says little about int8 error.
    inputs = reader.batches[:4]
    ref_session = make_session(fp32)
    session = make_session(proto.SerializeToString())
    diffs = compare_outputs(lambda x: ref_session.run(names, {INPUT_NAME: x}), session, inputs, names)
    raw = next((p.value for p in fp32_proto.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:  # pragma: no cover
        raise ExportError("exported model lost its convlens metadata")
    fp32_info = json.loads(raw).get("export", {})
    info = {**fp32_info, "format": "onnx", "int8": True, "quantization": "static QDQ, per-channel, U8S8, MinMax",
            "calibration_images": reader.count, "calibration_skipped": len(reader.skipped),
            "max_abs_diff_vs_fp32": diffs[LOGITS_NAME], "opset": _opset(proto), "outputs": names,
            **({"novelty_max_abs_diff_vs_fp32": diffs[NOVELTY_NAME]} if NOVELTY_NAME in diffs else {})}
    set_metadata(proto, meta, info)
    data = proto.SerializeToString()
    write_bytes(out, data)
    if reader.skipped:
        notes.append(f"skipped {len(reader.skipped)} unusable calibration files (first: {reader.skipped[0]})")
    return ExportResult(Path(out), "onnx-int8", len(data), diffs[LOGITS_NAME], fp32_info.get("exporter", ""),
                        info["opset"], names, notes), data


def novelty_only_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes only the ``novelty`` output needs: int8 leaves them in float, so the
    training features are never quantised (the pooled features feeding them still are)."""
    producer = {out: node for node in proto.graph.node for out in node.output}

    def ancestors(output: str) -> set[str]:
        seen: set[str] = set()
        todo = [output]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    outputs = [o.name for o in proto.graph.output]
    if NOVELTY_NAME not in outputs:
        return []
    others = set().union(*(ancestors(o) for o in outputs if o != NOVELTY_NAME))
    return sorted(ancestors(NOVELTY_NAME) - others)


# ----------------------------------------------------------------------------- accuracy
def decide(logits: np.ndarray, meta: BundleMeta) -> np.ndarray:
    """Predicted class indices from logits, the way ``convlens predict`` decides."""
    activation = decision.activation_for(np.shape(logits)[1])
    return decision.decide(decision.probabilities(logits, activation), activation, meta.threshold)


def accuracy_report(folder: str | os.PathLike[str], meta: BundleMeta,
                    models: dict[str, Callable[[np.ndarray], np.ndarray]], *,
                    batch_size: int = 32) -> dict[str, Any]:
    """Accuracy of each named ``logits`` function on a labelled folder, and how often they agree."""
    if not Path(folder).is_dir():
        raise DataError(f"validation folder {str(folder)!r} does not exist. Received: --validate {str(folder)!r}")
    items, _ = labelled_files(folder, meta.classes)
    prep = meta.preprocessing
    skipped: list[ImageError] = []
    labels: list[int] = []
    preds: dict[str, list[np.ndarray]] = {k: [] for k in models}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        loaded = list(_load_images([p for p, _ in chunk], prep, skipped))
        if not loaded:
            continue
        x = prep.normalize(np.stack([a for _, a in loaded]))
        labels.extend(chunk[i][1] for i, _ in loaded)
        for name, fn in models.items():
            preds[name].append(decide(fn(x), meta))
    if not labels:
        raise DataError(f"validation folder {str(folder)!r} has no usable images ({len(skipped)} unusable)")
    y = np.asarray(labels)
    p = {k: np.concatenate(v) for k, v in preds.items()}
    report: dict[str, Any] = {"images": int(len(y)), "skipped": len(skipped),
                              "accuracy": {k: float((v == y).mean()) for k, v in p.items()}}
    keys = list(p)
    if len(keys) == 2:
        report["agreement"] = float((p[keys[0]] == p[keys[1]]).mean())
        report["change"] = report["accuracy"][keys[1]] - report["accuracy"][keys[0]]
    return report
