"""An ensemble of EfficientNet-Lite backbones as ONE model: ``efficientnet_lite0+efficientnet_lite2``.

Every member reads the same input (the largest member's preprocessing: the Lite family shares
its normalisation, and all are stride 32 with TF ``same`` padding, so the last feature maps
have the same spatial size); :meth:`EnsembleModel.forward_features` concatenates their last
feature maps along the channels and one :class:`~convlens.models.zoo.GapDenseHead` reads them.
The head is still global average pooling + one dense layer, so the exact class activation
map, the pooled features novelty is measured in and the ONNX export work as for one backbone;
the ensemble's cost is about the sum of its members' at the largest member's input size.

A member's weights live under ``members.<i>.`` (its own classifier dropped); the registry
builds the model from its ``+`` name, so a bundle's ``arch`` round-trips like any other.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from convlens.errors import SpecError
from convlens.models.efficientnet import LITE_VARIANTS, EfficientNetLite
from convlens.models.model import ConvlensModel
from convlens.models.registry import register_ensemble
from convlens.models.shapes import RF, propagate_rf
from convlens.models.zoo import GapDenseHead, _ZooModel, check_dropout

SEPARATOR = "+"
MIN_MEMBERS, MAX_MEMBERS = 2, 3
_NAME = re.compile(r"^\w+(\+\w+)+$")  # names joined by '+' (a file such as ``a+b.pth`` is not one)


def is_ensemble_name(name: object) -> bool:
    """True when ``name`` joins model names with ``+`` (valid or not: :func:`ensemble_members` says)."""
    return isinstance(name, str) and _NAME.match(name) is not None


def ensemble_members(name: str, option: str = "model") -> tuple[str, ...]:
    """The member names of an ensemble name, validated: 2-3 distinct packaged Lite backbones.
    ``option`` names the option in the one-line error (``model`` or ``pretrained``)."""
    members = tuple(name.split(SEPARATOR))
    allowed = ", ".join(LITE_VARIANTS)
    unknown = [m for m in members if m not in LITE_VARIANTS]
    if unknown:
        raise SpecError(f"an ensemble joins packaged backbones with '+' ({allowed}); {unknown[0]!r} is not one. "
                        f"Received: {option}={name!r}")
    if len(set(members)) != len(members):
        raise SpecError(f"an ensemble names each backbone once. Received: {option}={name!r}")
    if not MIN_MEMBERS <= len(members) <= MAX_MEMBERS:
        raise SpecError(f"an ensemble has {MIN_MEMBERS} or {MAX_MEMBERS} members. Received: {option}={name!r}")
    return members


def largest_member(members: tuple[str, ...]) -> str:
    """The member with the largest native resolution: its preprocessing is the ensemble's."""
    return max(members, key=lambda m: LITE_VARIANTS[m].resolution)


def _member(name: str) -> EfficientNetLite:
    v = LITE_VARIANTS[name]
    member = EfficientNetLite(2, 3, v.width, v.depth)
    del member.head  # the ensemble's one head reads every member's map
    return member


def concat_maps(members: nn.ModuleList, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """The members' last feature maps for the input ``x``, concatenated along the channels."""
    maps = [m.forward_features(x) for m in members]
    sizes = [tuple(f.shape[2:]) for f in maps]
    if any(s != sizes[0] for s in sizes):  # cannot happen for the Lite family (all stride 32)
        raise SpecError(f"the ensemble's feature maps differ in size ({', '.join(map(str, sizes))} for "
                        f"{', '.join(names)}); its members must share their strides. "
                        f"Received: input {tuple(x.shape[2:])}")
    return torch.cat(maps, dim=1)


class ConcatFeatures(nn.Module):
    """The members as one unit (input -> concatenated map), for the per-unit views."""

    def __init__(self, members: nn.ModuleList, names: tuple[str, ...]) -> None:
        super().__init__()
        self.members = members
        self.names = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return concat_maps(self.members, self.names, x)

    def receptive_field(self, rf: RF) -> RF | None:
        # Side by side, not a chain: the widest member's (all share their strides).
        fields = [propagate_rf(m, rf) for m in self.members]
        known = [f for f in fields if f is not None]
        return max(known, key=lambda f: f.size) if len(known) == len(fields) else None


class EnsembleModel(_ZooModel):
    """2-3 EfficientNet-Lite feature extractors side by side and one GAP + dense head on the
    concatenation of their last feature maps (exact CAM)."""

    def __init__(self, names: tuple[str, ...], num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__(num_classes, in_channels)
        if in_channels != 3:
            raise SpecError(f"an ensemble of pretrained backbones takes RGB input (3 channels). "
                            f"Received: in_channels={in_channels}")
        check_dropout("ensemble", dropout)
        self.names = names
        self.members = nn.ModuleList(_member(n) for n in names)
        self.num_features = sum(m.num_features for m in self.members)
        self.head = GapDenseHead(self.num_features, self.out_units, float(dropout))
        self.head.init_small_()  # as a single Lite's head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return concat_maps(self.members, self.names, x)

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        # The members run side by side, not one after another: one unit holds them all, so the
        # units still compose to ``forward`` (summaries, the layer page).
        return [("members", SEPARATOR.join(self.names), ConcatFeatures(self.members, self.names)),
                ("head", "gap_dense", self.head)]

    def unit_branches(self) -> list[list[tuple[str, str, nn.Module]]]:
        # Each member's own units then the shared head: fine-tuning takes the last of each.
        head = ("head", "gap_dense", self.head)
        return [[*((f"members.{i}.{n}", k, u) for n, k, u in m.feature_units()), head]
                for i, m in enumerate(self.members)]


def ensemble(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> ConvlensModel:
    """An ensemble of 2-3 packaged EfficientNet-Lite backbones (``efficientnet_lite0+efficientnet_lite2``)."""
    return EnsembleModel(ensemble_members(name), num_classes, in_channels, dropout)


register_ensemble(is_ensemble_name, ensemble)
