"""Layer lists: the option checkers layers declare their schema with, the layer registry, and
reading, checking and building a list of layers (Keras semantics, shapes inferred).

A layer type is one :class:`SpecLayer` subclass in :mod:`convlens.models.layers`, registered
with :func:`register_layer`: it declares its options (``schema``), its output shape
(``output_shape``, like Keras's ``compute_output_shape``) and how it is built (``from_spec``).
A model is a list of layers, each a mapping with a ``type`` and its options::

    [{"type": "conv", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
     {"type": "max_pool", "pool_size": 2},
     {"type": "global_avg_pool"},
     {"type": "dense"}]                      # the last dense may omit units: set from the classes

Shapes are inferred while building, so a bad spec fails at build time with a message naming
the layer index and what was received.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from convlens.config import suggest
from convlens.errors import SpecError
from convlens.models.shapes import RF, Shape, keras_shape

# ----------------------------------------------------------------------------- option checkers
REQUIRED = object()


def positive_int(i: int, kind: str, key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SpecError(f"{where(i, kind)}: {key} must be {rule}. Received: {key}={v!r}")
    return v


def int_or_pair(i: int, kind: str, key: str, v: Any) -> int | list[int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise SpecError(f"{where(i, kind)}: {key} must be an integer or a pair [height, width]. Received: {key}={v!r}")
        return [positive_int(i, kind, key, x) for x in v]
    return positive_int(i, kind, key, v)


def optional_pair(i: int, kind: str, key: str, v: Any) -> int | list[int] | None:
    return None if v is None else int_or_pair(i, kind, key, v)


def padding_option(i: int, kind: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in ("valid", "same"):
        hint = suggest(v.lower(), ("valid", "same")) if isinstance(v, str) else ""
        raise SpecError(f"{where(i, kind)}: padding must be 'valid' or 'same'.{hint} Received: padding={v!r}")
    return v.lower()


def bool_option(i: int, kind: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"{where(i, kind)}: {key} must be true or false. Received: {key}={v!r}")
    return v


def number_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> Callable[..., float]:
    def check(i: int, kind: str, key: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            rule = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise SpecError(f"{where(i, kind)}: {key} must be a number {rule}. Received: {key}={v!r}")
        return float(v)
    return check


def interpolation_option(i: int, kind: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in ("nearest", "bilinear"):
        raise SpecError(f"{where(i, kind)}: interpolation must be 'nearest' or 'bilinear'. Received: {key}={v!r}")
    return v.lower()


def optional_int(i: int, kind: str, key: str, v: Any) -> int | None:
    return None if v is None else positive_int(i, kind, key, v)


# ----------------------------------------------------------------------------- layer types
class SpecLayer(nn.Module):
    """Base of every layer type. A subclass declares its ``kind`` (or ``kinds``), its options
    (``schema``: name -> (default or REQUIRED, checker)), its output shape and its builder."""

    kind = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    schema: ClassVar[dict[str, tuple[Any, Callable[..., Any]]]] = {}

    @classmethod
    def options(cls, kind: str) -> dict[str, tuple[Any, Callable[..., Any]]]:
        """The options of ``kind`` (one class may serve several kinds)."""
        return cls.schema

    @classmethod
    def output_shape(cls, i: int, spec: dict[str, Any], shape: Shape) -> Shape:
        """The output shape for an input of ``shape`` (batch excluded); SpecError when it cannot apply."""
        return shape

    @classmethod
    def from_spec(cls, spec: dict[str, Any], shape: Shape) -> SpecLayer:
        """The module for a checked ``spec`` on inputs of ``shape``."""
        raise NotImplementedError

    def receptive_field(self, rf: RF) -> RF | None:
        return rf

    def take_activation(self, act: nn.Module) -> bool:
        """Run ``act`` (the previous layer's activation) after this layer instead, when that gives
        the same output; True when taken."""
        return False


LAYERS: dict[str, type[SpecLayer]] = {}
COMMON_OPTIONS = ("type", "name")  # every layer takes these besides its schema


def register_layer(cls: type[SpecLayer]) -> type[SpecLayer]:
    """Class decorator: make a layer type (each of its kinds) usable in layer lists."""
    for kind in cls.kinds or (cls.kind,):
        if kind in LAYERS:
            raise ValueError(f"layer type {kind!r} is already registered")
        LAYERS[kind] = cls
    return cls


def need_map(i: int, spec: dict[str, Any], shape: Shape) -> None:
    """SpecError unless ``shape`` is a feature map (C, H, W)."""
    if len(shape) != 3:
        raise SpecError(f"{where(i, spec['type'])}: {spec['type']} needs a 4-D input (batch, height, width, "
                        f"channels) but receives a flat tensor; move it before 'flatten' / global pooling. "
                        f"Received: input shape {keras_shape(shape)}")


def where(i: int, kind: str | None) -> str:
    return f"layer {i} ({kind})" if kind else f"layer {i}"


def normalize_layer(i: int, raw: Any) -> dict[str, Any]:
    """Check one layer mapping and return it with every option filled in (JSON-safe)."""
    if not isinstance(raw, dict):
        raise SpecError(f"layer {i} must be a mapping like {{type: conv, filters: 16, ...}}. Received: {raw!r}")
    kind = raw.get("type")
    if kind is None:
        raise SpecError(f"layer {i} has no 'type'; use one of {', '.join(LAYERS)}. Received: {raw!r}")
    if not isinstance(kind, str) or kind not in LAYERS:
        hint = suggest(str(kind), LAYERS)
        raise SpecError(f"layer {i}: unknown layer type {kind!r}.{hint} Known types: {', '.join(LAYERS)}. "
                        f"Received: type={kind!r}")
    schema = LAYERS[kind].options(kind)
    out: dict[str, Any] = {"type": kind}
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise SpecError(f"{where(i, kind)}: name must be a non-empty string. Received: name={name!r}")
        out["name"] = name
    for key in raw:
        if key not in schema and key not in COMMON_OPTIONS:
            options = list(schema) + list(COMMON_OPTIONS)
            hint = suggest(str(key), options)
            raise SpecError(f"{where(i, kind)}: unknown option {key!r}.{hint} Options: "
                            f"{', '.join(schema) or '(none)'}. Received: {key}={raw[key]!r}")
    for key, (default, check) in schema.items():
        if key in raw:
            out[key] = check(i, kind, key, raw[key])
        elif default is REQUIRED:
            raise SpecError(f"{where(i, kind)}: missing required option {key!r}. Received: {_brief(raw)}")
        else:
            out[key] = default
    return out


def _brief(raw: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in raw.items()) + "}"


# ----------------------------------------------------------------------------- building
@dataclass
class BuiltLayers:
    """The result of building a layer list: modules plus what shape inference found."""

    modules: list[SpecLayer]
    specs: list[dict[str, Any]]  # canonical, JSON-safe
    names: list[str]
    shapes: list[Shape]  # output shape of each layer, batch dimension excluded


def build_layers(layers: Sequence[Any], input_shape: Sequence[int | None], *, fuse_pool: bool = True) -> BuiltLayers:
    """Build a layer list for inputs of ``input_shape`` = (C, H, W) (H/W may be None: unknown).

    With ``fuse_pool`` a layer may take over the activation of the layer before it
    (:meth:`SpecLayer.take_activation`): a ReLU before a max pool runs after the pool instead,
    identical output on 4x fewer values.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise SpecError(f"a model spec must be a non-empty list of layers. Received: {layers!r}")
    shape: Shape = tuple(input_shape)
    modules: list[SpecLayer] = []
    specs: list[dict[str, Any]] = []
    shapes: list[Shape] = []
    for i, raw in enumerate(layers):
        spec = normalize_layer(i, raw)
        layer_cls = LAYERS[spec["type"]]
        out_shape = layer_cls.output_shape(i, spec, shape)
        module, shape = layer_cls.from_spec(spec, shape), out_shape
        if len(shape) == 3 and any(n is not None and n < 1 for n in shape[1:]):
            raise SpecError(f"{where(i, spec['type'])}: the output would be empty; the input is too small for "
                            f"this layer. Received: output shape {keras_shape(shape)}")
        modules.append(module)
        specs.append(spec)
        shapes.append(shape)
    if fuse_pool:
        for a, b in zip(modules, modules[1:], strict=False):
            act = getattr(a, "act", None)
            if act is not None and not isinstance(act, nn.Identity) and b.take_activation(act):
                a.act = nn.Identity()
    return BuiltLayers(modules, specs, _layer_names(specs), shapes)


def _layer_names(specs: list[dict[str, Any]]) -> list[str]:
    """User names, else Keras-style ``conv``, ``conv_1``, ``conv_2``, ..."""
    counts: dict[str, int] = {}
    names = []
    for spec in specs:
        if "name" in spec:
            names.append(spec["name"])
            continue
        n = counts.get(spec["type"], 0)
        counts[spec["type"]] = n + 1
        names.append(spec["type"] if n == 0 else f"{spec['type']}_{n}")
    return names


def init_keras_(module: nn.Module) -> None:
    """Keras's default initialisation: Glorot-uniform kernels, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LayerStack(nn.Module):
    """A built layer list as a plain sequential module (no classification head rules)."""

    def __init__(self, layers: Sequence[Any], input_shape: Sequence[int | None], *, fuse_pool: bool = True) -> None:
        super().__init__()
        built = build_layers(layers, input_shape, fuse_pool=fuse_pool)
        self.layers = nn.ModuleList(built.modules)
        self.specs, self.names, self.shapes = built.specs, built.names, built.shapes
        init_keras_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- layer files
def load_layer_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML/JSON layer file: a list of layers, or a mapping with ``layers`` (and ``name``)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"model file {str(p)!r} does not exist; pass a registered model "
                        "(see `convlens summary --list`) or an existing .yaml/.json layer file")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"model file {str(p)!r} is not valid JSON (line {e.lineno}: {e.msg}); fix the syntax") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"model file {str(p)!r} is not valid YAML{line}; fix the syntax") from e
    if isinstance(data, list):
        data = {"layers": data}
    if not isinstance(data, dict) or "layers" not in data:
        raise SpecError(f"model file {str(p)!r} must hold a list of layers or a mapping with 'layers:'. "
                        f"Received: {type(data).__name__}")
    allowed = ("layers", "name", "description")
    for key in data:
        if key not in allowed:
            raise SpecError(f"model file {str(p)!r}: unknown key {key!r}.{suggest(str(key), allowed)} "
                            f"Keys: {', '.join(allowed)}. Received: {key}={data[key]!r}")
    if not isinstance(data["layers"], list) or not data["layers"]:
        raise SpecError(f"model file {str(p)!r}: 'layers' must be a non-empty list. Received: layers={data['layers']!r}")
    return data
