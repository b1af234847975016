"""CNN building blocks, the model zoo and summaries. Never imports ``convlens.data``.

Public API: :func:`create`, :func:`list_models`, :func:`register_model`, :func:`build_from_arch`,
:func:`build_from_spec`, :func:`build_model` (a name, a layer file or a layer list),
:class:`ConvlensModel` and :func:`summarize`.
"""

from __future__ import annotations

from convlens.models import efficientnet as _efficientnet  # noqa: F401  (registers efficientnet_lite0-2)
from convlens.models import resnet as _resnet  # noqa: F401  (registers resnet18/34/50)
from convlens.models import zoo as _zoo  # noqa: F401  (registers the zoo's models)
from convlens.models.layers import (
    LAYER_TYPES,
    ConvlensModel,
    LayerStack,
    SpecModel,
    build_from_spec,
    build_layers,
)
from convlens.models.registry import (
    build_from_arch,
    build_model,
    create,
    list_models,
    load_layer_file,
    register_model,
)
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
    "list_models",
    "load_layer_file",
    "parse_input_shape",
    "print_summary",
    "register_model",
    "summarize",
]
