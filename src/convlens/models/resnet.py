"""ResNet-18/34/50 (He et al. 2016) with torchvision's module names, for local weight files.

The names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``...) are torchvision's,
so its state_dicts load key for key; its classifier ``fc`` is replaced by convlens's GAP + dense
head (``head.fc``). No weights ship with convlens: pass a file with ``--pretrained PATH``.
"""

from __future__ import annotations

import torch
from torch import nn

from convlens.models.model import ConvlensModel
from convlens.models.registry import register_model
from convlens.models.shapes import RF, propagate_rf
from convlens.models.zoo import BasicBlock, GapDenseHead, _init_conv_bn, _ZooModel, projection


class ResNetBasicBlock(BasicBlock):
    """The zoo's basic block under torchvision's names (its shortcut is ``downsample``)."""

    shortcut_name = "downsample"


class ResNetBottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's "ResNet v1.5"), 1x1 expand x4, plus the input."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))

    def receptive_field(self, rf: RF) -> RF | None:
        return propagate_rf(self.conv3, propagate_rf(self.conv2, propagate_rf(self.conv1, rf)))


class ResNet(_ZooModel):
    """7x7/2 stem, 3x3/2 max pool, four stages (64/128/256/512 wide), GAP + dense (exact CAM)."""

    def __init__(self, block: type[ResNetBasicBlock] | type[ResNetBottleneck], layers: tuple[int, int, int, int],
                 num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = cin
        self.head = GapDenseHead(cin, self.out_units)
        _init_conv_bn(self)
        for m in self.modules():  # each block starts as its shortcut (torchvision's zero_init_residual)
            if isinstance(m, (ResNetBasicBlock, ResNetBottleneck)):
                nn.init.zeros_((m.bn3 if isinstance(m, ResNetBottleneck) else m.bn2).weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def summary_units(self) -> list[tuple[str, str, nn.Module]]:
        stem = nn.Sequential(self.conv1, self.bn1, self.relu)
        return [("stem", "conv_bn_relu", stem), ("maxpool", "max_pool", self.maxpool),
                *[(f"layer{i}", "res_stage", getattr(self, f"layer{i}")) for i in range(1, 5)],
                ("head", "gap_dense", self.head)]


@register_model
def resnet18(num_classes: int, in_channels: int = 3) -> ConvlensModel:
    """ResNet-18 with torchvision's names (11.2M parameters), for a local weight file."""
    return ResNet(ResNetBasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model
def resnet34(num_classes: int, in_channels: int = 3) -> ConvlensModel:
    """ResNet-34 with torchvision's names (21.3M parameters), for a local weight file."""
    return ResNet(ResNetBasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@register_model
def resnet50(num_classes: int, in_channels: int = 3) -> ConvlensModel:
    """ResNet-50 (v1.5) with torchvision's names (23.5M parameters), for a local weight file."""
    return ResNet(ResNetBottleneck, (3, 4, 6, 3), num_classes, in_channels)
