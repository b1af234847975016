"""The model bundle: one zip file holding ``model.json`` and ``weights.safetensors``.

``model.json`` carries everything needed to use the model: the architecture (registry name and
arguments, or a layer list), class names, the :class:`Preprocessing` (input size, channel order,
resize policy, scaling), training metrics, the resolved config and the library versions.
Loading never unpickles anything; the weights' SHA-256 is checked so a tampered or truncated
file gives a clear one-line error instead of silently wrong predictions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.data.preprocess import Preprocessing
from convlens.errors import BundleError, first_line
from convlens.files import write_bytes
from convlens.infer.novelty import NoveltyIndex
from convlens.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT = "convlens-bundle"
FORMAT_VERSION = 1
SUFFIX = ".convlens"
NOVELTY_TENSORS = "novelty.safetensors"
NOVELTY_PATHS = "novelty_paths.json"


@dataclass
class BundleMeta:
    """The torch-free part of a bundle (``model.json``)."""

    arch: dict[str, Any]
    classes: list[str]
    preprocessing: Preprocessing
    output_activation: str  # "sigmoid" (one unit, two classes) or "softmax"
    threshold: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    weights_sha256: str = ""
    created: str = ""
    # The model's answer is the average of the logits of the image and its mirror (the training
    # report measured it so); load_model wraps the model accordingly (convlens.models.tta).
    flip_average: bool = False
    # What ``precision="auto"`` means for this model: "auto" (bf16 where the hardware has it) or
    # "fp32" when training measured bf16 moving its probabilities too far
    # (convlens.evaluate.bf16_agreement). An explicit bf16/fp32 request still wins.
    precision: str = "auto"
    # Calibration: the logits are divided by this temperature (fitted at training time without
    # the validation images); load_model wraps the model accordingly (convlens.models.tta).
    temperature: float = 1.0
    # Novelty (convlens.infer.novelty.NoveltyIndex.to_json): method, k, threshold, accept, rule,
    # and the digest of novelty.safetensors; None in bundles written before novelty existed.
    novelty: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def inference_precision(self, requested: str = "auto") -> str:
        """``requested`` (auto, bf16 or fp32), with ``auto`` narrowed to what training measured."""
        return self.precision if str(requested).lower() == "auto" else requested

    def to_json(self) -> dict[str, Any]:
        """``model.json``: the format marker, then every field in declaration order."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **fields,
                "classes": list(self.classes), "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> BundleMeta:
        if d.get("format") != FORMAT:
            raise BundleError(f"{where} is not a convlens bundle (model.json has no 'format: {FORMAT}')")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise BundleError(f"{where} was written by a newer convlens (bundle format {d.get('format_version')}); upgrade convlens")
        try:
            return cls(
                arch=dict(d["arch"]),
                classes=[str(c) for c in d["classes"]],
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                output_activation=str(d["output_activation"]),
                threshold=float(d.get("threshold", 0.5)),
                metrics=dict(d.get("metrics") or {}),
                config=dict(d.get("config") or {}),
                versions=dict(d.get("versions") or {}),
                weights_sha256=str(d.get("weights_sha256", "")),
                created=str(d.get("created", "")),
                flip_average=bool(d.get("flip_average", False)),
                precision=_precision(d.get("precision", "auto")),
                temperature=_temperature(d.get("temperature", 1.0)),
                novelty=None if d.get("novelty") is None else dict(d["novelty"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where} has an invalid model.json ({e}); re-export the bundle") from e


def _precision(value: Any) -> str:
    if value not in ("auto", "fp32"):
        raise ValueError(f"precision must be auto or fp32, not {value!r}")
    return str(value)


def _temperature(value: Any) -> float:
    t = float(value)
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive number, not {value!r}")
    return t


def save_bundle(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    meta: BundleMeta,
    novelty: NoveltyIndex | None = None,
) -> Path:
    """Write ``model``'s weights and ``meta`` atomically to ``path`` (a ``.convlens`` zip), with
    the novelty index (``novelty.safetensors`` + ``novelty_paths.json``) when given."""
    import torch
    from safetensors.torch import save

    from convlens.models.tta import unwrap

    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    state = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}
    weights = save(state)
    meta.weights_sha256 = hashlib.sha256(weights).hexdigest()
    meta.versions = {"convlens": __version__, "torch": torch.__version__, **meta.versions}
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    extra: dict[str, bytes] = {}
    if novelty is not None:
        from safetensors.numpy import save as save_numpy

        extra[NOVELTY_TENSORS] = save_numpy(novelty.tensors())
        extra[NOVELTY_PATHS] = json.dumps(list(novelty.paths)).encode()
        meta.novelty = novelty.to_json(hashlib.sha256(extra[NOVELTY_TENSORS]).hexdigest())
    path = Path(path)
    buf = io.BytesIO()  # whole in memory first: its size is known, so its space is checked and reserved
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model.json", json.dumps(meta.to_json(), indent=2, default=str))
        z.writestr("weights.safetensors", weights)
        for name, blob in extra.items():
            z.writestr(name, blob)
    write_bytes(path, buf.getvalue())
    return path


def _open(path: str | os.PathLike[str]) -> zipfile.ZipFile:
    p = Path(path)
    if not p.exists():
        raise BundleError(f"model bundle {str(p)!r} does not exist; check the path (bundles end in {SUFFIX})")
    if p.is_dir():
        candidate = p / f"model{SUFFIX}"
        if candidate.is_file():
            return _open(candidate)
        raise BundleError(f"{str(p)!r} is a folder without a model{SUFFIX}; pass the bundle file")
    try:
        return zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{str(p)!r} is not a readable model bundle (truncated or not a zip: {e})") from e


def read_meta(path: str | os.PathLike[str]) -> BundleMeta:
    """Read only ``model.json`` (no torch needed)."""
    with _open(path) as z:
        return _read_meta(z, str(path))


def _member(z: zipfile.ZipFile, name: str, where: str, missing: str) -> bytes:
    """One file of the bundle; a one-line BundleError when it is missing or damaged."""
    try:
        return z.read(name)
    except KeyError as e:
        raise BundleError(f"{where} has no {name}; {missing}") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise BundleError(f"{where} is damaged ({e}); restore it or export it again") from e


def _read_meta(z: zipfile.ZipFile, where: str) -> BundleMeta:
    raw = _member(z, "model.json", where, "it is not a convlens bundle")
    try:
        return BundleMeta.from_json(json.loads(raw), where)
    except json.JSONDecodeError as e:
        raise BundleError(f"{where} has a damaged model.json ({e})") from e


def weights_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the bundle's ``weights.safetensors`` as stored (torch-free; computed, not the recorded one)."""
    with _open(path) as z:
        return hashlib.sha256(_member(z, "weights.safetensors", str(path), "it is incomplete")).hexdigest()


def read_novelty(path: str | os.PathLike[str], meta: BundleMeta | None = None) -> NoveltyIndex | None:
    """The bundle's novelty index (torch-free), or None for a bundle written without one.

    Strict: a missing member, a digest that does not match or inconsistent shapes raise a
    one-line BundleError; the section is never silently ignored.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_numpy

    where = str(path)
    with _open(path) as z:
        meta = meta or _read_meta(z, where)
        if meta.novelty is None:
            return None
        blob = _member(z, NOVELTY_TENSORS, where, "its novelty section is incomplete; retrain or use --no-reject")
        raw_paths = _member(z, NOVELTY_PATHS, where, "its novelty section is incomplete; retrain or use --no-reject")
    if hashlib.sha256(blob).hexdigest() != meta.novelty.get("sha256"):
        raise BundleError(f"{where}: {NOVELTY_TENSORS} does not match its recorded SHA-256 (file modified or damaged)")
    try:
        tensors = load_numpy(blob)
        paths = json.loads(raw_paths)
    except (SafetensorError, ValueError, OSError) as e:
        raise BundleError(f"{where}: the novelty section is not readable ({e}); retrain or use --no-reject") from e
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BundleError(f"{where}: {NOVELTY_PATHS} is not a list of paths; retrain or use --no-reject")
    return NoveltyIndex.from_parts(meta.novelty, tensors, paths, meta.num_classes, where)


def read_weights(path: str | os.PathLike[str]) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Read ``model.json`` and the verified weights as a state dict of CPU tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = str(path)
    with _open(path) as z:
        meta = _read_meta(z, where)
        blob = _member(z, "weights.safetensors", where, "it is incomplete")
    if meta.weights_sha256 and hashlib.sha256(blob).hexdigest() != meta.weights_sha256:
        raise BundleError(f"{where}: weights do not match their recorded SHA-256 (file modified or damaged)")
    try:
        state = load(blob)
    except (SafetensorError, ValueError, OSError) as e:
        raise BundleError(f"{where}: weights.safetensors is not valid safetensors ({e})") from e
    return meta, state


def load_model(path: str | os.PathLike[str], device: str = "cpu") -> tuple[torch.nn.Module, BundleMeta]:
    """Rebuild the model of a bundle with its weights, in eval mode on ``device``.

    A bundle with ``flip_average`` gives the flip-averaged model, one with a ``temperature`` its
    calibrated logits (what its report measured).
    """
    from convlens.models import build_from_arch
    from convlens.models.tta import flip_averaged, temperature_scaled

    meta, state = read_weights(path)
    model = build_from_arch(meta.arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{path}: weights do not fit the architecture in model.json "
                          f"({first_line(e, None)})") from e
    if meta.flip_average:
        model = flip_averaged(model)
    model = temperature_scaled(model, meta.temperature)
    return model.to(device).eval(), meta
