"""Model registry (timm style): ``@register_model``, ``create()``, ``list_models()``.

A model is named either by a registered name (``resnet8``) or by a YAML/JSON layer file; both
round-trip through ``model.arch`` and :func:`build_from_arch`, which is what bundles store.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from convlens.config import suggest
from convlens.errors import SpecError
from convlens.models.model import ConvlensModel, build_from_spec, check_classes

F = TypeVar("F", bound=Callable[..., ConvlensModel])

_REGISTRY: dict[str, Callable[..., ConvlensModel]] = {}
# Composite names (``a+b``, models.ensemble): (is it one, builder(name, num_classes, ...)).
_COMPOSITES: list[tuple[Callable[[str], bool], Callable[..., ConvlensModel]]] = []
LAYER_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def register_model(fn: F) -> F:
    """Register ``fn(num_classes, in_channels=3, **kwargs) -> ConvlensModel`` under its name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def register_ensemble(is_name: Callable[[str], bool], builder: Callable[..., ConvlensModel]) -> None:
    """Build every name ``is_name`` accepts with ``builder(name, num_classes, in_channels=3, **kwargs)``
    (an ensemble of registered models); such names are not listed."""
    _COMPOSITES.append((is_name, builder))


def _builder(name: str) -> Callable[..., ConvlensModel] | None:
    if name in _REGISTRY:
        return _REGISTRY[name]
    composite = next((b for is_name, b in _COMPOSITES if is_name(name)), None)
    return None if composite is None else functools.partial(composite, name)


def is_registered(name: str) -> bool:
    """True when ``name`` is a registered model or a composite of them (``a+b``)."""
    return _builder(name) is not None


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def model_description(name: str) -> str:
    """First line of a registered model's docstring."""
    doc = inspect.getdoc(_REGISTRY[name]) or ""
    return doc.splitlines()[0] if doc else ""


def _unknown_model(name: str) -> SpecError:
    return SpecError(f"unknown model {name!r}.{suggest(name, _REGISTRY)} Available: {', '.join(list_models())}, "
                     f"or a YAML/JSON layer file. Received: model={name!r}")


def create(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> ConvlensModel:
    """Build the registered model ``name`` with fresh weights."""
    fn = _builder(name)
    if fn is None:
        raise _unknown_model(name)
    check_classes(num_classes, in_channels)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [k for k in params if k not in ("num_classes", "in_channels")]
        for key, value in kwargs.items():
            if key not in allowed:
                raise SpecError(f"model {name!r} has no option {key!r}.{suggest(key, allowed)} Options: "
                                f"{', '.join(allowed) or '(none)'}. Received: {key}={value!r}")
    model = fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels,
                  "kwargs": json.loads(json.dumps(kwargs))}
    return model


def build_from_arch(arch: dict[str, Any]) -> ConvlensModel:
    """Rebuild a model from its ``arch`` dict (what a bundle's model.json stores)."""
    if not isinstance(arch, dict):
        raise SpecError(f"a model architecture must be a mapping. Received: {type(arch).__name__}")
    try:
        num_classes, in_channels = arch["num_classes"], arch.get("in_channels", 3)
        if "layers" in arch:
            return build_from_spec(arch["layers"], num_classes, in_channels, arch.get("input_size"))
        return create(arch["name"], num_classes, in_channels, **dict(arch.get("kwargs") or {}))
    except KeyError as e:
        raise SpecError(f"a model architecture needs 'name' or 'layers', and 'num_classes'. "
                        f"Received: keys {sorted(arch)}") from e


def is_layer_file(model: str | os.PathLike[str]) -> bool:
    """True when ``model`` names a layer file rather than a registered model."""
    s = str(model)
    return not is_registered(s) and (s.lower().endswith(LAYER_FILE_SUFFIXES) or os.sep in s or Path(s).is_file())


def build_model(model: str | os.PathLike[str] | Sequence[dict[str, Any]], num_classes: int, in_channels: int = 3,
                input_size: int | Sequence[int] | None = None, **kwargs: Any) -> ConvlensModel:
    """A registered name, a layer file path or a layer list -> a model (what ``--model`` accepts)."""
    if isinstance(model, (list, tuple)):
        return build_from_spec(list(model), num_classes, in_channels, input_size)
    name = str(model)
    if is_registered(name):
        return create(name, num_classes, in_channels, **kwargs)
    if is_layer_file(name):
        if kwargs:
            raise SpecError(f"model arguments apply to registered models only; put options for a layer file "
                            f"in the file itself. Received: {kwargs!r} for {name!r}")
        return build_from_spec(name, num_classes, in_channels, input_size)
    raise _unknown_model(name)
