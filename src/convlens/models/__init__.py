"""CNN building blocks, the model zoo and summaries. Never imports ``convlens.data``.

Layout: ``shapes`` (shape formulas, receptive fields), ``spec`` (option checkers, the layer
registry, reading and building layer lists), ``layers`` (one class per layer type), ``model``
(``ConvlensModel``, ``SpecModel``, ``build_from_spec``), ``registry`` (named models), ``zoo``,
``summary``.

Public API: :func:`create_model` (the one door: from scratch or pretrained), :func:`create`, :func:`list_models`, :func:`register_model`, :func:`build_from_arch`,
:func:`build_from_spec`, :func:`build_model` (a name, a layer file or a layer list),
:class:`ConvlensModel` and :func:`summarize`.
"""

from __future__ import annotations

from convlens.models import efficientnet as _efficientnet  # noqa: F401  (registers efficientnet_lite0-2)
from convlens.models import ensemble as _ensemble  # noqa: F401  (builds 'a+b' ensembles of them)
from convlens.models import resnet as _resnet  # noqa: F401  (registers resnet18/34/50)
from convlens.models import zoo as _zoo  # noqa: F401  (registers the zoo's models)
from convlens.models.create import create_model
from convlens.models.layers import LAYER_TYPES
from convlens.models.model import ConvlensModel, SpecModel, build_from_spec
from convlens.models.registry import (
    build_from_arch,
    build_model,
    create,
    list_models,
    register_model,
)
from convlens.models.spec import LayerStack, build_layers, load_layer_file
from convlens.models.summary import Summary, parse_input_shape, print_summary, summarize

__all__ = [
    "LAYER_TYPES",
    "ConvlensModel",
    "LayerStack",
    "SpecModel",
    "Summary",
    "build_from_arch",
    "build_from_spec",
    "build_layers",
    "build_model",
    "create",
    "create_model",
    "list_models",
    "load_layer_file",
    "parse_input_shape",
    "print_summary",
    "register_model",
    "summarize",
]
