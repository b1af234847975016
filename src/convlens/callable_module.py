"""Packages that are also verbs: ``convlens.audit(...)``, ``convlens.evaluate(...)``, ``convlens.export(...)``.

``convlens.audit``, ``convlens.evaluate`` and ``convlens.export`` are sub-packages, and Python's import system sets
``convlens.<name>`` to the sub-package whenever it is imported, so a plain function of that name
in ``convlens/__init__.py`` would be replaced at the first ``import convlens.export.onnx``.
Instead each of these packages is made callable: calling it runs its verb function.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any


def callable_module(module_name: str, function_name: str) -> None:
    """Make the (already imported) module ``module_name`` callable as its ``function_name``."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, function_name)(*args, **kwargs)

    CallableModule.__call__.__doc__ = f"Run ``{module_name}.{function_name}``."
    module.__class__ = CallableModule
    # help() and IDEs show the verb's parameters for `convlens.evaluate(` too.
    module.__signature__ = inspect.signature(getattr(module, function_name))  # type: ignore[attr-defined]
