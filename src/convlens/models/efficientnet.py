"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" edge variant) with TensorFlow-exact padding.

The Lite variants drop squeeze-excite, use ReLU6 and keep the stem (32) and head (1280) widths
fixed when scaling. Convolutions use TensorFlow's ``same`` padding (the odd pixel at the
bottom/right, :class:`convlens.models.layers.Conv`) and batch norm eps 1e-3, so ImageNet weights
trained in TensorFlow (the ``tf_efficientnet_lite*`` checkpoints) give the same outputs here.

Module names (``stem``, ``blocks.N.expand|dw|project``, ``head_conv``, ``head.fc``) are
convlens's own; :func:`remap_lukemelas_keys` renames checkpoints that use the EfficientNet-PyTorch
names (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...), as the weight packages do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from convlens.errors import SpecError
from convlens.models.layers import Conv
from convlens.models.model import ConvlensModel
from convlens.models.registry import register_model
from convlens.models.zoo import GapDenseHead, _init_conv_bn, _ZooModel

BN_EPS = 1e-3  # TensorFlow's batch norm epsilon: the weights were trained with it
STEM_WIDTH, HEAD_WIDTH = 32, 1280  # fixed for the Lite family

# EfficientNet-B0's stages: (repeats, kernel, stride, expansion (1: depthwise separable), channels).
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """Width and depth multipliers and the native input resolution of one Lite model."""

    width: float
    depth: float
    resolution: int


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260),
}


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor``, never below 90% of the request (TF's rule)."""
    out = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * channels else out


class ConvBNAct(nn.Module):
    """TF-``same`` convolution (no bias), batch norm (eps 1e-3), optional ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = Conv(cin, cout, (kernel, kernel), (stride, stride), "same", use_bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act: nn.Module = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual (1x1 expand, depthwise kxk, 1x1 project) or, with expansion 1, a depthwise
    separable block (no expand). A residual connection when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.expand: nn.Module = ConvBNAct(cin, mid, 1) if expansion != 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def stage_repeats(depth: float) -> list[int]:
    """Blocks per stage: ``ceil(repeats * depth)``, the first and last stages unscaled (Lite)."""
    last = len(B0_STAGES) - 1
    return [r if i in (0, last) else int(math.ceil(r * depth)) for i, (r, *_rest) in enumerate(B0_STAGES)]


class EfficientNetLite(_ZooModel):
    """Stem, 16-20 MBConv blocks, 1x1 head conv to 1280 channels, then GAP + dense (exact CAM)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__(num_classes, in_channels)
        if not 0 <= dropout < 1:
            raise SpecError(f"efficientnet_lite dropout must be in [0, 1). Received: dropout={dropout!r}")
        self.stem = ConvBNAct(in_channels, STEM_WIDTH, 3, 2)
        blocks: list[nn.Module] = []
        cin = STEM_WIDTH
        for (_, kernel, stride, expansion, cout), n in zip(B0_STAGES, stage_repeats(depth), strict=True):
            cout = make_divisible(cout * width)
            for i in range(n):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expansion))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = ConvBNAct(cin, HEAD_WIDTH, 1)
        self.head = GapDenseHead(HEAD_WIDTH, self.out_units, dropout)
        self.num_features = HEAD_WIDTH
        # Fan-out normal convolutions (as the reference), unit batch norm, a small dense layer;
        # used when no weights load.
        _init_conv_bn(self)
        self.head.init_small_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_conv(self.blocks(self.stem(x)))

    def feature_units(self) -> list[tuple[str, str, nn.Module]]:
        """The units of :meth:`forward_features` (stem, blocks, head conv), in execution order."""
        units: list[tuple[str, str, nn.Module]] = [("stem", "conv_bn_relu6", self.stem)]
        for i, block in enumerate(self.blocks):
            units.append((f"blocks.{i}", "mbconv" if isinstance(block.expand, ConvBNAct) else "ds_conv", block))
        return [*units, ("head_conv", "conv_bn_relu6", self.head_conv)]

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        return [*self.feature_units(), ("head", "gap_dense", self.head)]


def _lite(name: str, num_classes: int, in_channels: int, dropout: float | None) -> EfficientNetLite:
    v = LITE_VARIANTS[name]
    return EfficientNetLite(num_classes, in_channels, v.width, v.depth, 0.0 if dropout is None else dropout)


@register_model
def efficientnet_lite0(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> ConvlensModel:
    """EfficientNet-Lite0 (4.7M parameters with an ImageNet head; 224 px), for pretrained weights."""
    return _lite("efficientnet_lite0", num_classes, in_channels, dropout)


@register_model
def efficientnet_lite1(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> ConvlensModel:
    """EfficientNet-Lite1 (5.4M parameters with an ImageNet head; 240 px), for pretrained weights."""
    return _lite("efficientnet_lite1", num_classes, in_channels, dropout)


@register_model
def efficientnet_lite2(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> ConvlensModel:
    """EfficientNet-Lite2 (6.1M parameters with an ImageNet head; 260 px), for pretrained weights."""
    return _lite("efficientnet_lite2", num_classes, in_channels, dropout)


# EfficientNet-PyTorch names -> convlens names. In a block, _bn0/_bn1/_bn2 follow the expand,
# depthwise and project convolutions; at the top, _bn0 follows the stem and _bn1 the head conv.
_LUKEMELAS_RULES = [
    (re.compile(r"^_conv_stem\.weight$"), "stem.conv.conv.weight"),
    (re.compile(r"^_bn0\.(.+)$"), r"stem.bn.\1"),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\.weight$"), r"blocks.\1.expand.conv.conv.weight"),
    (re.compile(r"^_blocks\.(\d+)\._bn0\.(.+)$"), r"blocks.\1.expand.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\.weight$"), r"blocks.\1.dw.conv.conv.weight"),
    (re.compile(r"^_blocks\.(\d+)\._bn1\.(.+)$"), r"blocks.\1.dw.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\.weight$"), r"blocks.\1.project.conv.conv.weight"),
    (re.compile(r"^_blocks\.(\d+)\._bn2\.(.+)$"), r"blocks.\1.project.bn.\2"),
    (re.compile(r"^_conv_head\.weight$"), "head_conv.conv.conv.weight"),
    (re.compile(r"^_bn1\.(.+)$"), r"head_conv.bn.\1"),
    (re.compile(r"^_fc\.(weight|bias)$"), r"head.fc.\1"),
]


def is_lukemelas_state(keys: list[str]) -> bool:
    """True when a state_dict uses the EfficientNet-PyTorch names."""
    return any(k.startswith("_conv_stem.") for k in keys)


def remap_lukemelas_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys to convlens's; unknown keys are kept as they are (and then
    reported by the strict loader)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _LUKEMELAS_RULES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                break
        out[new] = value
    return out
