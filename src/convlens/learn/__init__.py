"""Learning features: see every building block at work on a real photo and a real model.

- :func:`demo_layer` (``convlens demo-layer``): one layer applied to a photo, input beside
  output, with the shape arithmetic in the title.
- :func:`inspect_model` (``convlens inspect``): every layer's output shape and feature maps,
  the first layer's kernels and, for a trained bundle, the channels that respond most, on one
  self-contained HTML page.
"""

from __future__ import annotations

from convlens.learn.demo_layer import (
           KINDS,
           NAMED_KERNELS,
           DemoResult,
           apply_layer,
           arithmetic,
           demo_layer,
)
from convlens.learn.layer_page import InspectResult, LayerView, inspect_model

__all__ = ["KINDS", "NAMED_KERNELS", "DemoResult", "InspectResult", "LayerView", "apply_layer", "arithmetic",
           "demo_layer", "inspect_model"]
