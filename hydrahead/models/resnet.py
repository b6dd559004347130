"""ResNet-18/34/50 (torchvision-equivalent trunk) with an embedding neck.

The trunk matches torchvision's layout and parameter count exactly (7x7 stride-2 stem,
max-pool, four stages, global average pool; the stride sits on the 3x3 conv of a
Bottleneck, as in "ResNet v1.5"). In place of the 1000-way ``fc`` there is a face
recognition style neck ``Linear(feat, D) -> BatchNorm1d(D)`` under the attribute ``neck``.

BatchNorm layers are plain ``nn.BatchNorm2d``; a caller that wants synchronized batch
statistics converts the model with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Images (B x 3 x H x W) -> embedding (B x embed_dim).

    ``zero_init_residual`` sets the gamma of the last BN in every residual block to 0, so
    each block starts as the identity: this is what keeps large-batch training with a
    high learning rate stable in its first steps (Goyal et al., 2017).
    """

    input_kind = "images"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        embed_dim: int,
        *,
        zero_init_residual: bool = True,
        in_channels: int = 3,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self._in_ch = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, layers[0], stride=1)
        self.layer2 = self._make_stage(block, 128, layers[1], stride=2)
        self.layer3 = self._make_stage(block, 256, layers[2], stride=2)
        self.layer4 = self._make_stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = 512 * block.expansion
        # No bias on the Linear: the BatchNorm right after it removes any constant shift.
        self.neck = nn.Sequential(nn.Linear(self.feat_dim, embed_dim, bias=False), nn.BatchNorm1d(embed_dim))
        self._init_weights(zero_init_residual)

    def _make_stage(self, block, width: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_ch = width * block.expansion
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(_conv1x1(self._in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        blocks = [block(self._in_ch, width, stride, downsample)]
        self._in_ch = out_ch
        blocks += [block(out_ch, width) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.neck(x)


def resnet18(embed_dim: int, **kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), embed_dim, **kwargs)


def resnet34(embed_dim: int, **kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), embed_dim, **kwargs)


def resnet50(embed_dim: int, **kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), embed_dim, **kwargs)
