"""Flip-averaged prediction as a model: ``(f(x) + f(mirror(x))) / 2`` on the logits.

Baking the average into the model (rather than into each caller) gives one answer everywhere:
the training report, ``predict``, ``serve``, the Python API and the exported ONNX graph, which
then contains the mirror and the average itself, so any ONNX consumer gets the same result.

The features are averaged too, the mirrored view's flipped back into place. For a global
average pooling + dense head this is exact: ``head(mean(F(x), flip(F(flip(x)))))`` equals the
mean of the two views' logits (GAP and the dense layer are linear), so the exact class
activation map of the averaged model is the average of the two views' maps.
"""

from __future__ import annotations

from torch import Tensor, nn

from convlens.models.model import ConvlensModel


class FlipAveraged(ConvlensModel):
    """Wraps a :class:`ConvlensModel`; ``inner`` keeps the weights (save ``inner``'s state dict)."""

    def __init__(self, inner: ConvlensModel) -> None:
        super().__init__(inner.num_classes, inner.in_channels)
        self.inner = inner
        self.output_activation = inner.output_activation
        self.arch = inner.arch

    def forward_features(self, x: Tensor) -> Tensor:
        a = self.inner.forward_features(x)
        b = self.inner.forward_features(x.flip(3)).flip(3)
        return (a + b) * 0.5

    def forward_head(self, features: Tensor) -> Tensor:
        return self.inner.forward_head(features)

    def forward(self, x: Tensor) -> Tensor:
        # Logits of each view: exact for any head (the features' average is exact only for GAP + dense).
        return (self.inner(x) + self.inner(x.flip(3))) * 0.5

    def gap_linear_head(self) -> nn.Linear | None:
        return self.inner.gap_linear_head()

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        return self.inner.summary_units()


def flip_averaged(model: ConvlensModel) -> ConvlensModel:
    """``model`` wrapped in :class:`FlipAveraged` (unchanged when it already is)."""
    return model if isinstance(model, FlipAveraged) else FlipAveraged(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The model that owns the weights (``inner`` of a :class:`FlipAveraged`)."""
    return model.inner if isinstance(model, FlipAveraged) else model
