"""Inference-time wrappers stored as bundle fields: flip-averaged prediction
(``(f(x) + f(mirror(x))) / 2`` on the logits) and temperature scaling (``f(x) / T``, the
calibration fitted at training time).

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


class Wrapper(ConvlensModel):
    """A :class:`ConvlensModel` around ``inner``, which keeps the weights (save ``inner``'s state
    dict): its output activation, arch, head, summary and branches are ``inner``'s."""

    def __init__(self, inner: ConvlensModel) -> None:
        super().__init__(inner.num_classes, inner.in_channels)
        self.inner = inner
        self.output_activation = inner.output_activation
        self.arch = inner.arch

    def gap_linear_head(self) -> nn.Linear | None:
        return self.inner.gap_linear_head()

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        return self.inner.summary_units()

    def unit_branches(self) -> list[list[tuple[str, str, nn.Module]]]:
        return self.inner.unit_branches()


class FlipAveraged(Wrapper):
    """The average of ``inner``'s outputs on an image and its mirror."""

    def forward_features(self, x: Tensor) -> Tensor:
        a = self.inner.forward_features(x)
        b = self.inner.forward_features(x.flip(3)).flip(3)
        return (a + b) * 0.5

    def forward_head(self, features: Tensor) -> Tensor:
        return self.inner.forward_head(features)

    def forward(self, x: Tensor) -> Tensor:
        # Logits of each view: exact for any head (the features' average is exact only for GAP + dense).
        return (self.inner(x) + self.inner(x.flip(3))) * 0.5

    def forward_pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        la, pa = self.inner.forward_pooled(x)
        lb, pb = self.inner.forward_pooled(x.flip(3))  # pooling is mirror-invariant: no flip back
        return (la + lb) * 0.5, (pa + pb) * 0.5


class TemperatureScaled(Wrapper):
    """Logits divided by a temperature fitted at training time, so every path that runs the
    model (report, predict, serve, the API, the ONNX graph) gives calibrated probabilities.
    The class decision never changes (argmax and the sign of a single logit are kept); class
    maps come from the unscaled head (their normalisation removes the scale anyway)."""

    def __init__(self, inner: ConvlensModel, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0. Received: temperature={temperature!r}")
        super().__init__(inner)
        self.temperature = float(temperature)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.inner.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.inner.forward_head(features) / self.temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) / self.temperature

    def forward_pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, pooled = self.inner.forward_pooled(x)
        return logits / self.temperature, pooled


def temperature_scaled(model: ConvlensModel, temperature: float) -> ConvlensModel:
    """``model`` with its logits divided by ``temperature`` (unchanged at 1)."""
    return model if temperature == 1.0 else TemperatureScaled(model, temperature)


def flip_averaged(model: ConvlensModel) -> ConvlensModel:
    """``model`` wrapped in :class:`FlipAveraged` (unchanged when it already is)."""
    return model if isinstance(model, FlipAveraged) else FlipAveraged(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The model that owns the weights: the innermost of nested :class:`Wrapper` models
    (:class:`FlipAveraged`, :class:`TemperatureScaled`)."""
    while isinstance(model, Wrapper):
        model = model.inner
    return model
