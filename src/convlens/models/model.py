"""The model classes: :class:`ConvlensModel` (the contract every model meets) and
:class:`SpecModel`, a classifier built from a layer list by :func:`build_from_spec`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convlens.decision import OUTPUT_ACTIVATIONS, activation_for
from convlens.errors import SpecError
from convlens.models.layers import Dense, Dropout, GlobalPool
from convlens.models.shapes import keras_shape
from convlens.models.spec import (
    BuiltLayers,
    build_layers,
    init_keras_,
    load_layer_file,
    normalize_layer,
    where,
)


def out_units_for(num_classes: int) -> int:
    """One logit for two classes (sigmoid), else one per class (softmax)."""
    return 1 if num_classes == 2 else num_classes


def check_classes(num_classes: Any, in_channels: Any) -> None:
    """Validate the class and channel counts every model takes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise SpecError(f"num_classes must be an integer >= 2. Received: num_classes={num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise SpecError(f"in_channels must be a positive integer (1 grayscale, 3 RGB). Received: in_channels={in_channels!r}")


class ConvlensModel(nn.Module):
    """Base of every convlens model: ``forward(x) = forward_head(forward_features(x))`` -> logits.

    The final sigmoid/softmax is never inside the model; ``output_activation`` names it.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        check_classes(num_classes, in_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.out_units = out_units_for(num_classes)
        self.output_activation = activation_for(self.out_units)
        self.arch: dict[str, Any] = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map, N x C x h x w."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> logits (N x out_units)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, pooled)`` in one pass: the logits of :meth:`forward` and the global average
        of the last feature map (N x C), the model's own description of an image that novelty
        (distance to the training images) is measured in."""
        features = self.forward_features(x)
        return self.forward_head(features), features.mean(dim=(2, 3))

    def gap_linear_head(self) -> nn.Linear | None:
        """The dense layer when the head is exactly global average pooling + one dense layer."""
        return None

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        """(name, type, module) in execution order; run one after another they equal ``forward``."""
        raise NotImplementedError

    def unit_branches(self) -> list[list[tuple[str, str, nn.Module]]]:
        """The units as parallel paths from the input to the logits, each in execution order
        (what fine-tuning picks its last units from): one path, :meth:`summary_units`, unless
        the model runs branches side by side (an ensemble: each member's units, then the head)."""
        return [self.summary_units()]


class SpecModel(ConvlensModel):
    """A classifier built from a layer list (see :func:`build_from_spec`)."""

    def __init__(self, built: BuiltLayers, num_classes: int, in_channels: int, output_activation: str,
                 arch: dict[str, Any]) -> None:
        super().__init__(num_classes, in_channels)
        self.layers = nn.ModuleList(built.modules)
        self.names = built.names
        self.specs = built.specs
        self.shapes = built.shapes
        # Features end at the last layer that still outputs a feature map.
        maps = [i for i, s in enumerate(built.shapes) if len(s) == 3]
        self.split = maps[-1] + 1 if maps else 0
        self.output_activation = output_activation
        self.arch = arch
        init_keras_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[: self.split]:
            x = layer(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[self.split:]:
            features = layer(features)
        return features

    def gap_linear_head(self) -> nn.Linear | None:
        # Dropout is the identity at inference, so it does not break the exact CAM.
        head = [m for m in self.layers[self.split:] if not isinstance(m, Dropout)]
        if (len(head) == 2 and isinstance(head[0], GlobalPool) and head[0].mode == "avg"
                and isinstance(head[1], Dense) and isinstance(head[1].act, nn.Identity)):
            return head[1].linear
        return None

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        return [(n, s["type"], m) for n, s, m in zip(self.names, self.specs, self.layers, strict=True)]


def _input_size(input_size: Any) -> tuple[int | None, int | None]:
    if input_size is None:
        return None, None
    if isinstance(input_size, int) and not isinstance(input_size, bool) and input_size > 0:
        return input_size, input_size
    if isinstance(input_size, (list, tuple)) and len(input_size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size):
        return int(input_size[0]), int(input_size[1])
    raise SpecError(f"input_size must be a positive integer or (height, width). Received: input_size={input_size!r}")


def build_from_spec(layers: Sequence[dict[str, Any]] | str | Any, num_classes: int, in_channels: int = 3,
                    input_size: int | Sequence[int] | None = None, *, fuse_pool: bool = True) -> SpecModel:
    """Build a classifier from a layer list (or the path of a YAML/JSON layer file).

    The output is ``out_units`` logits: a final ``dense`` may omit ``units`` (set from
    ``num_classes``: 1 for two classes); a final sigmoid/softmax (a layer, or the last dense's
    ``activation``) is recorded as ``output_activation`` and not applied. ``input_size`` (H, W)
    lets shapes be checked at build time; it is needed when a ``flatten`` feeds a ``dense``.
    """
    prefix = ""
    if not isinstance(layers, (list, tuple)):
        prefix = f"model file {str(layers)!r}: "
        layers = load_layer_file(layers)["layers"]
    check_classes(num_classes, in_channels)
    h, w = _input_size(input_size)
    try:
        return _build_model(list(layers), num_classes, in_channels, (h, w), fuse_pool)
    except SpecError as e:
        if prefix:
            raise SpecError(prefix + str(e)) from e
        raise


def _build_model(layers: list[Any], num_classes: int, in_channels: int, hw: tuple[int | None, int | None],
                 fuse_pool: bool) -> SpecModel:
    if not layers:
        raise SpecError("a model spec must be a non-empty list of layers. Received: []")
    specs = [normalize_layer(i, raw) for i, raw in enumerate(layers)]
    arch = {"layers": copy.deepcopy(specs), "num_classes": num_classes, "in_channels": in_channels,
            "input_size": None if hw[0] is None else [hw[0], hw[1]]}
    out_units = out_units_for(num_classes)
    recorded: str | None = None
    last = specs[-1]
    if last["type"] in OUTPUT_ACTIVATIONS:
        recorded = last["type"]
        specs = specs[:-1]
        if not specs:
            raise SpecError(f"layer 0 ({recorded}): a model needs layers before its output activation. "
                            f"Received: {len(layers)} layer")
        last = specs[-1]
    if last["type"] == "dense":
        act = last["activation"]
        if act in OUTPUT_ACTIVATIONS:
            if recorded:
                raise SpecError(f"{where(len(specs) - 1, 'dense')}: two output activations in a row. "
                                f"Received: activation={act!r} followed by a {recorded!r} layer")
            recorded, last["activation"] = act, None
        if last["units"] is None:
            last["units"] = out_units
        elif last["units"] != out_units:
            need = "1 unit (two classes use one sigmoid unit)" if out_units == 1 else f"{out_units} units"
            raise SpecError(f"{where(len(specs) - 1, 'dense')}: the final dense layer must have {need} for "
                            f"{num_classes} classes; omit units to set it automatically. Received: units={last['units']}")
    if recorded == "sigmoid" and out_units != 1:
        raise SpecError(f"the final activation 'sigmoid' needs one output unit (two classes) but the model has "
                        f"{out_units} classes; use softmax. Received: activation='sigmoid'")
    if recorded == "softmax" and out_units == 1:
        raise SpecError("a softmax over one unit is always 1; two classes use one sigmoid unit. "
                        "Received: activation='softmax' with 2 classes")
    built = build_layers(specs, (in_channels, hw[0], hw[1]), fuse_pool=fuse_pool)
    final = built.shapes[-1]
    if len(final) != 1 or (final[0] is not None and final[0] != out_units):
        raise SpecError(f"the model must end with {out_units} output(s) for {num_classes} classes (for example "
                        f"global_avg_pool then dense). Received: final output shape {keras_shape(final)}")
    return SpecModel(built, num_classes, in_channels, recorded or activation_for(out_units), arch)
