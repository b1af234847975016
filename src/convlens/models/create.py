"""The one door to a model, as timm's ``create_model``: from scratch or pretrained, by name.

``create_model("vgg10", 2)`` builds a registry model (or a layer-list file) with fresh weights;
``create_model("efficientnet_lite0", 5, pretrained="efficientnet_lite0")`` (a packaged name, a
weight file, or :class:`PretrainedWeights` already read) builds the architecture with the
backbone's ImageNet weights and a fresh classifier. Training, fine-tuning, lr-find and the
feature extractor all come through here, so a run reads and hashes a weight file once
(:func:`read_pretrained`) however many models it builds from it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from convlens.errors import WeightsError
from convlens.models.model import ConvlensModel
from convlens.models.pretrained import PretrainedWeights, pretrained_model, read_pretrained
from convlens.models.registry import build_model


def create_model(name: str | os.PathLike[str] | Sequence[dict[str, Any]] | None, num_classes: int,
                 in_channels: int = 3, *, pretrained: PretrainedWeights | str | None = None,
                 **kwargs: Any) -> ConvlensModel:
    """A model for ``num_classes``: ``name`` a registry name, layer-list file or layer list
    (``kwargs``: its arguments, ``input_size`` for layer lists); with ``pretrained``, the
    backbone weights (``name`` may then be None: the weights name their architecture)."""
    if pretrained is None:
        if name is None:
            raise WeightsError("create_model needs a model name or pretrained weights. Received: name=None")
        return build_model(name, num_classes, in_channels, **kwargs)
    weights = pretrained if isinstance(pretrained, PretrainedWeights) else read_pretrained(
        pretrained, None if name is None else str(name))
    if name is not None and str(name) != weights.source.arch:
        raise WeightsError(f"the weights are {weights.source.arch}, not {name}. Received: name={name!r}")
    if in_channels != 3:
        raise WeightsError(f"pretrained backbones take RGB input (3 channels). Received: in_channels={in_channels}")
    return pretrained_model(weights, num_classes)
